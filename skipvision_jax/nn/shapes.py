"""A model config's shapes without its weights: the dummy inputs `init`
traces, and the params' shapes and shardings planned on a mesh."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.nn.vlm import SkipVisionVLM


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
