"""Flax linen modules of the model."""

from skipvision_jax.nn.vlm import SkipVisionVLM

__all__ = ["SkipVisionVLM"]
