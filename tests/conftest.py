"""Tiny random configs and inputs shared by the tests."""

from __future__ import annotations

import os

# The tests compile hundreds of tiny programs, so compiling, not running, is
# their cost, and most of it is the CPU backend's LLVM optimization: off for
# the tests and the processes they start (they inherit XLA_FLAGS), the same
# programs in less optimized machine code (test_train + test_generate: 8.5 ->
# 5.8 min on 2 cores). Set before anything imports JAX.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# The command lines' persistent compilation cache is off in the tests and the
# processes they start: they count compilations; tests/test_compilation_cache.py turns it on.
os.environ["SKIPVISION_JAX_COMPILATION_CACHE"] = ""

import dataclasses  # noqa: E402
import functools  # noqa: E402

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from skipvision_jax.compilation import CompileCounter
from skipvision_jax.config import (
    DecoderConfig,
    LayoutConfig,
    ModelConfig,
    SkipConfig,
    VisionConfig,
)
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.nn.shapes import init_inputs

TINY_VISION = VisionConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)  # 16 patches
TINY_DECODER = DecoderConfig(vocab_size=97, width=48, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=96)


def tiny_config(**overrides) -> ModelConfig:
    base = ModelConfig(
        vision=TINY_VISION,
        layout=LayoutConfig(image_offset=2, num_kept=6, merge_to=5, summary_tokens=True),
        skip=SkipConfig(enabled=True),
        decoder=TINY_DECODER,
    )
    return dataclasses.replace(base, **overrides)


def tiny_batch(cfg: ModelConfig, batch: int = 2, num_text: int = 7, seed: int = 0) -> dict[str, jax.Array]:
    k_ids, k_px = jax.random.split(jax.random.key(seed))
    input_ids = jax.random.randint(k_ids, (batch, num_text), 1, cfg.decoder.vocab_size)
    text_mask = jnp.ones((batch, num_text), bool).at[-1, -2:].set(False)  # last example right-padded
    loss_mask = jnp.zeros((batch, num_text), bool).at[:, -3:].set(True) & text_mask
    pixels = jax.random.normal(k_px, (batch, cfg.vision.image_size, cfg.vision.image_size, cfg.vision.num_channels))
    return {"input_ids": input_ids, "text_mask": text_mask, "loss_mask": loss_mask, "pixels": pixels}


@functools.cache
def init_params(cfg: ModelConfig, seed: int = 0):
    """(model, params); cached, since compiling `init` dominates a tiny test."""
    model = SkipVisionVLM(cfg)
    variables = jax.jit(model.init)(jax.random.key(seed), **init_inputs(cfg, num_text=7))
    return model, nn.unbox(variables["params"])


def stack_layers(params, segments: list[tuple[int, int]]):
    """Unrolled `layer_i` params -> the scanned layout: `layers_a_b/block` per
    segment [a, b), its layers stacked on a leading axis."""
    decoder = dict(params["decoder"])
    for start, end in segments:
        layers = [decoder.pop(f"layer_{i}") for i in range(start, end)]
        decoder[f"layers_{start}_{end}"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return {**params, "decoder": decoder}


def logits_of(model: SkipVisionVLM, params, batch: dict[str, jax.Array]) -> jax.Array:
    return jax.jit(model.apply)({"params": params}, batch["input_ids"], batch["text_mask"], batch["pixels"])


@pytest.fixture(autouse=True)
def _float32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture
def compile_counter():
    counter = CompileCounter()
    yield counter
    counter.close()


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A tiny model trained far enough to be right on some validation questions
    and wrong on others (eval.py's and serve.py's tests share it)."""
    from skipvision_jax.train.loop import train_and_evaluate
    from tests.helpers import VAL_SIZE, tiny_train_config

    path = str(tmp_path_factory.mktemp("trained") / "run")
    overrides = {
        "train.steps": 60,
        "train.checkpoint_every": 60,
        "train.eval_every": 60,
        "optimizer.decay_steps": 60,
        "optimizer.lr": 3e-3,
        "data.val_size": VAL_SIZE,
        "train.batch_size": 16,
    }
    train_and_evaluate(tiny_train_config(**overrides), path)
    return path
