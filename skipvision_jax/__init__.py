"""skipvision_jax: Skip-Vision (ICCV 2025) in JAX/Flax."""

from skipvision_jax import compilation

# Before any program compiles: see compilation.BOUNDED_CPU_MEMORY_FLAG.
compilation.bound_cpu_memory()

from skipvision_jax.config import ModelConfig  # noqa: E402

__all__ = ["ModelConfig"]
