"""Tiny training configs, their command-line form, and run helpers shared by the training tests."""

from __future__ import annotations

import json
import os
import socket

import jax

from configs.default import get_config
from skipvision_jax import sharding
from skipvision_jax.data.pipeline import text_format
from skipvision_jax.experiment import build_model_config, with_data_settings
from skipvision_jax.train.checkpoint import Checkpointer
from skipvision_jax.train.state import build_state_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_SIZE = 32  # validation questions of the trained tiny model (conftest.trained_workdir)

TINY_OVERRIDES = {
    "model.vision.width": 32,
    "model.vision.depth": 1,
    "model.vision.num_heads": 2,
    "model.vision.mlp_dim": 32,
    "model.vision.patch_size": 8,
    "model.vision.pooled_grids": (2,),
    "model.layout.num_kept": 4,
    "model.layout.merge_to": 6,
    "model.decoder.width": 32,
    "model.decoder.num_layers": 2,
    "model.decoder.mlp_dim": 64,
    "data.train_size": 256,
    "data.val_size": 16,
    "train.batch_size": 8,
    "train.steps": 12,
    "train.log_every": 1,
    "train.eval_every": 6,
    "train.checkpoint_every": 6,
    "optimizer.warmup_steps": 2,
    "optimizer.decay_steps": 12,  # one schedule whether a run stops at 6 or goes on to 12
}


def tiny_train_config(**overrides):
    cfg = get_config()
    cfg.update_from_flattened_dict({**TINY_OVERRIDES, **overrides})
    return cfg


def override_flags(**overrides) -> list[str]:
    flags = []
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        flags.append(f"--config.{key}={value}")
    return flags


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def state_plan(cfg):
    """(model, optimizer, sharding.ShardedInit) on one device."""
    text = text_format(cfg.data)
    cfg = with_data_settings(cfg, text)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return build_state_plan(cfg, build_model_config(cfg, text), mesh, sharding.DEFAULT_RULES)


def restore_params(workdir, cfg):
    """(state, data_state) of the newest checkpoint, restored onto this process's first device."""
    target = state_plan(cfg)[2].abstract
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), 3)
    try:
        return checkpointer.restore_latest(target)
    finally:
        checkpointer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def subprocess_env(devices: int) -> dict[str, str]:
    """Environment for a child JAX process with `devices` fake CPU devices."""
    return {
        **os.environ,
        # Keeps the test session's flags (conftest.py), adds the device count.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {os.environ.get('XLA_FLAGS', '')}".strip(),
        "PYTHONPATH": REPO,
        "JAX_PLATFORMS": "cpu",
    }
