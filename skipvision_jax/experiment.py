"""Experiment setup shared by the trainer, inference, interop, tests and
benches: the model config of an experiment, the dummy inputs `init` traces,
and the train state planned (shapes and shardings) before it exists."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig, model_config_from_dict
from skipvision_jax.data.pipeline import DataSpec
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.train.optim import make_optimizer, trainable_names
from skipvision_jax.train.step import TrainState, init_train_state

log = logging.getLogger(__name__)


def init_inputs(model_cfg: ModelConfig, num_text: int, batch: int = 1) -> dict[str, np.ndarray]:
    """Inputs of the shapes `SkipVisionVLM.init` traces (the values do not
    reach the weights): `num_text` real text tokens and a blank image."""
    v = model_cfg.vision
    return {
        "input_ids": np.zeros((batch, num_text), np.int32),
        "text_mask": np.ones((batch, num_text), bool),
        "pixels": np.zeros((batch, v.image_size, v.image_size, v.num_channels), np.float32),
    }


def abstract_params(model_cfg: ModelConfig, mesh: Mesh | None, rules=sharding.DEFAULT_RULES) -> dict:
    """Shapes (and shardings) of a config's params, without creating them."""
    model = SkipVisionVLM(model_cfg)
    inputs = init_inputs(model_cfg, max(model_cfg.layout.image_offset, 1))
    init = lambda: model.init(jax.random.key(0), **inputs)["params"]
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return sharding.plan_init(init, mesh, rules).abstract


def base_model_config(cfg) -> ModelConfig:
    """`cfg.model`, or with `cfg.init_from_hf` the tower and decoder of that
    Hugging Face LLaVA directory under `cfg.model`'s layout, skip and dtype."""
    if not cfg.get("init_from_hf"):
        return model_config_from_dict(cfg.model.to_dict())
    from skipvision_jax.interop import hf_llava

    ours = model_config_from_dict(cfg.model.to_dict())
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
    from skipvision_jax.interop import hf_llava

    imported, _ = hf_llava.load_params(directory, abstract_params, strict=False)
    log.info("initialized from %s", directory)
    return hf_llava.merge_into(params, imported)
