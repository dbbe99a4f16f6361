"""A model config's shapes without its weights: the dummy inputs `init`
traces, and the params' shapes and shardings planned on a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.nn.vlm import SkipVisionVLM


def init_inputs(model_cfg: ModelConfig, num_text: int | None = None, batch: int = 1) -> dict[str, np.ndarray]:
    """Inputs of the shapes `SkipVisionVLM.init` traces (neither their values
    nor the text's length reach the weights): `num_text` real text tokens
    (default: the fewest the layout takes) and a blank image."""
    num_text = max(model_cfg.layout.image_offset, 1) if num_text is None else num_text
    v = model_cfg.vision
    return {
        "input_ids": np.zeros((batch, num_text), np.int32),
        "text_mask": np.ones((batch, num_text), bool),
        "pixels": np.zeros((batch, v.image_size, v.image_size, v.num_channels), np.float32),
    }


def held_in(params, dtype: str):
    """The floating leaves of `params` as `dtype` (a config's `param_dtype`);
    logical-axis boxes kept. Weights are drawn in float32, then held so."""
    target = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def init_params(model_cfg: ModelConfig, seed: int) -> dict:
    """A config's fresh params (boxed with their logical axis names), in its `param_dtype`."""
    model = SkipVisionVLM(model_cfg)
    return held_in(model.init(jax.random.key(seed), **init_inputs(model_cfg))["params"], model_cfg.param_dtype)


def abstract_params(model_cfg: ModelConfig, mesh: Mesh | None, rules=sharding.DEFAULT_RULES) -> dict:
    """Shapes, dtypes (`param_dtype`) and shardings of a config's params, without creating them."""
    init = lambda: init_params(model_cfg, 0)
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return sharding.plan_init(init, mesh, rules).abstract
