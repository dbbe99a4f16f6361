"""Optimizer: AdamW, warm-up + cosine, gradient clipping, trainable-part selection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

# Top-level parameter collections of SkipVisionVLM, by LLaVA training stage.
TRAINABLE_PRESETS = {
    "projector": ("visual_tokens",),  # LLaVA stage 1: projector (+ summary tokens) only
    "projector+decoder": ("visual_tokens", "embed", "decoder", "final_norm", "lm_head"),  # stage 2
    "all": ("vision", "visual_tokens", "embed", "decoder", "final_norm", "lm_head"),
}


def trainable_names(preset: str) -> tuple[str, ...]:
    if preset not in TRAINABLE_PRESETS:
        raise ValueError(f"optimizer.trainable: unknown {preset!r}, expected one of {tuple(TRAINABLE_PRESETS)}")
    return TRAINABLE_PRESETS[preset]


def split_params(params: Mapping[str, Any], names: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) top-level collections. Only the trainable part is
    differentiated and gets optimizer state."""
    trainable = {k: v for k, v in params.items() if k in names}
    frozen = {k: v for k, v in params.items() if k not in names}
    return trainable, frozen


def learning_rate_schedule(cfg) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.optimizer.lr,
        warmup_steps=cfg.optimizer.warmup_steps,
        decay_steps=max(cfg.optimizer.decay_steps or cfg.train.steps, cfg.optimizer.warmup_steps + 1),
        end_value=cfg.optimizer.lr * cfg.optimizer.final_lr_fraction,
    )


def make_optimizer(cfg) -> optax.GradientTransformation:
    """`cfg` is the experiment ConfigDict (sections `optimizer`, `train`)."""
    opt = cfg.optimizer
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay),
    )
