"""The train state planned (shapes and shardings) before it exists, and
built from the seed under that plan."""

from __future__ import annotations

from collections.abc import Callable

import optax

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.nn.shapes import init_params
from skipvision_jax.train.optim import make_optimizer, trainable_names
from skipvision_jax.train.step import TrainState, init_train_state


def state_initializer(model_cfg: ModelConfig, cfg, optimizer, trainable) -> Callable[[], TrainState]:
    """Builds the train state from the seed, its weights (in `param_dtype`; their
    optimizer moments in float32) still boxed with logical axis names."""
    return lambda: init_train_state(init_params(model_cfg, cfg.train.seed), optimizer, trainable, cfg.train.seed)


def build_state_plan(
    cfg, model_cfg: ModelConfig, mesh, rules
) -> tuple[SkipVisionVLM, optax.GradientTransformation, sharding.ShardedInit]:
    model, optimizer = SkipVisionVLM(model_cfg), make_optimizer(cfg)
    plan = sharding.plan_init(
        state_initializer(model_cfg, cfg, optimizer, trainable_names(cfg.optimizer.trainable)), mesh, rules
    )
    return model, optimizer, plan
