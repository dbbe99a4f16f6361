"""Experiment setup shared by the trainer, inference, interop, tests and
benches: the model config of an experiment, where its weights start, and
the train state planned (shapes and shardings) before it exists."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import traverse_util
from jax.sharding import Mesh

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig, model_config_from_dict
from skipvision_jax.data.pipeline import DataSpec
from skipvision_jax.interop import hf_llava
from skipvision_jax.interop.parts import given_parts, load_parts, model_config_from_parts
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.nn.shapes import init_inputs
from skipvision_jax.train.checkpoint import Checkpointer, CheckpointError
from skipvision_jax.train.optim import make_optimizer, trainable_names
from skipvision_jax.train.step import TrainState, init_train_state

log = logging.getLogger(__name__)


def base_model_config(cfg) -> ModelConfig:
    """`cfg.model`, with the tower and decoder sizes of where the run starts:
    a Hugging Face LLaVA directory (`cfg.init_from_hf`), the parts
    (`cfg.init.language_model` / `vision_tower`, interop/parts.py) or an
    earlier run (`cfg.init.checkpoint`), under `cfg.model`'s layout, skip and dtype."""
    ours = model_config_from_dict(cfg.model.to_dict())
    init = cfg.get("init") or {}
    parts = given_parts(init)
    starts = {
        "init_from_hf": cfg.get("init_from_hf"),
        "init.checkpoint": init.get("checkpoint"),
        "the parts (init.language_model, init.vision_tower, init.projector)": parts,
    }
    given = [name for name, value in starts.items() if value]
    if len(given) > 1:
        raise ValueError(f"{given[0]}: a run starts from one of {', '.join(starts)}; got {' and '.join(given)}")
    if init.get("checkpoint"):  # LLaVA's stage 2: the sizes stage 1 trained
        trained = base_model_config(run_config(init["checkpoint"]))
        return dataclasses.replace(ours, vision=trained.vision, decoder=trained.decoder)
    if parts:
        return model_config_from_parts(ours, parts)
    if not cfg.get("init_from_hf"):
        return ours
    if ours.scan_layers:
        raise ValueError("model.scan_layers: init_from_hf loads unrolled layers; set it to False")
    imported = hf_llava.model_config_from_hf(
        hf_llava.read_config(cfg.init_from_hf), layout=ours.layout, skip=ours.skip, dtype=ours.dtype
    )
    vision = dataclasses.replace(imported.vision, pooled_grids=ours.vision.pooled_grids)
    return dataclasses.replace(imported, vision=vision, remat=ours.remat, remat_policy=ours.remat_policy)


def model_image_size(cfg) -> int:
    """The image side the data pipeline must produce."""
    return base_model_config(cfg).vision.image_size


def build_model_config(cfg, data: DataSpec) -> ModelConfig:
    model_cfg = base_model_config(cfg)
    if model_cfg.layout.image_offset != data.image_offset:
        raise ValueError(
            f"model.layout.image_offset: {model_cfg.layout.image_offset}, but the data puts the image after {data.image_offset} text tokens"
        )
    if model_cfg.decoder.vocab_size < data.vocab_size:
        raise ValueError(
            f"model.decoder.vocab_size: {model_cfg.decoder.vocab_size} is smaller than the tokenizer's {data.vocab_size}"
        )
    return model_cfg


def state_initializer(
    model: SkipVisionVLM, model_cfg: ModelConfig, cfg, optimizer, trainable
) -> Callable[[], TrainState]:
    """Builds the train state from the seed, its weights (and their optimizer
    moments) still boxed with logical axis names."""
    inputs = init_inputs(model_cfg, cfg.data.text_len)

    def init() -> TrainState:
        params = model.init(jax.random.key(cfg.train.seed), **inputs)["params"]
        return init_train_state(params, optimizer, trainable, cfg.train.seed)

    return init


def build_state_plan(
    cfg, model_cfg: ModelConfig, mesh, rules
) -> tuple[SkipVisionVLM, optax.GradientTransformation, sharding.ShardedInit]:
    model, optimizer = SkipVisionVLM(model_cfg), make_optimizer(cfg)
    plan = sharding.plan_init(
        state_initializer(model, model_cfg, cfg, optimizer, trainable_names(cfg.optimizer.trainable)), mesh, rules
    )
    return model, optimizer, plan


def import_hf_weights(directory: str, params: dict, abstract_params: dict) -> dict:
    """`params` with every weight the HF directory has replaced by it (in place
    in its sharding); the parts transformers lacks (summary tokens, routers)
    keep their fresh initialization."""
    imported, _ = hf_llava.load_params(directory, abstract_params, strict=False)
    log.info("initialized from %s", directory)
    return hf_llava.merge_into(params, imported)


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    cfg: ml_collections.ConfigDict  # the run's train.py config
    data: DataSpec
    model_cfg: ModelConfig
    params: dict


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a train.py workdir was trained with."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"no checkpoint at {workdir} (missing config.json)")
    with open(config_path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_run(workdir: str, mesh: Mesh, rules=None) -> RestoredRun:
    """The params of the newest good checkpoint in a train.py workdir,
    restored onto `mesh` under `rules` (default: the run's own), whatever
    mesh trained them."""
    cfg = run_config(workdir)
    data = DataSpec(cfg.data, model_image_size(cfg))
    model_cfg = build_model_config(cfg, data)
    rules = rules or sharding.logical_rules(cfg.get("mesh"))
    abstract = build_state_plan(cfg, model_cfg, mesh, rules)[2].abstract
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.train.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"no checkpoint at {workdir}/checkpoints")
    return RestoredRun(cfg, data, model_cfg, restored[0].params)


def params_of_run(workdir: str, abstract_params: dict, mesh: Mesh, rules) -> dict:
    """The params of a run (`init.checkpoint`: LLaVA's stage 2 starts from
    stage 1's), which must have exactly our parameters and shapes."""
    run_params = traverse_util.flatten_dict(restore_run(workdir, mesh, rules).params, sep="/")
    ours = traverse_util.flatten_dict(abstract_params, sep="/")
    differ = sorted(
        path
        for path in ours.keys() | run_params.keys()
        if getattr(run_params.get(path), "shape", None) != getattr(ours.get(path), "shape", None)
    )
    if differ:
        raise ValueError(
            f"init.checkpoint: {workdir} does not have this model's parameters: {differ[:3]}{' ...' if len(differ) > 3 else ''}"
        )
    log.info("initialized from the params of %s", workdir)
    return traverse_util.unflatten_dict(run_params, sep="/")


def initial_params(cfg, params: dict, abstract_params: dict, mesh: Mesh, rules) -> dict:
    """A fresh run's params: `params` (the seed's), with a whole LLaVA
    (`init_from_hf`), the parts (`init.language_model`, `init.vision_tower`,
    `init.projector`) or a run's params (`init.checkpoint`) put in place."""
    init = cfg.get("init") or {}  # one of these is given (base_model_config checked)
    if init.get("checkpoint"):
        return params_of_run(init["checkpoint"], abstract_params, mesh, rules)
    if cfg.get("init_from_hf"):
        return import_hf_weights(cfg.init_from_hf, params, abstract_params)
    parts = given_parts(init)
    if parts:
        log.info("initialized from %s", parts)
        return load_parts(parts, params, abstract_params)
    return params
