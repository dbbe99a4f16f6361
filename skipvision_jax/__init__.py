"""skipvision_jax: Skip-Vision (ICCV 2025) in JAX/Flax."""

from skipvision_jax.config import ModelConfig

__all__ = ["ModelConfig"]
