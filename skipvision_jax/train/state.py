"""The train state planned (shapes and shardings) before it exists, and
built from the seed under that plan."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.nn.shapes import init_inputs
from skipvision_jax.train.optim import make_optimizer, trainable_names
from skipvision_jax.train.step import TrainState, init_train_state


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
