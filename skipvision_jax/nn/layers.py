"""Building blocks shared by the vision tower and the decoder.

Every weight carries logical axis names (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, ...) so that sharding is a table of rules in
`skipvision_jax.sharding`, not a property of the modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

# Kernels start at N(0, 1/fan_in) (LeCun normal: Flax's default, CLIP's
# scale). GPT-2's and LLaMA's fixed 0.02 (`initializer_range`) is about that at
# widths of 2,500-4,000, but 4.4x smaller at 128: the embedded task's decoder
# then started with near-uniform attention and near-linear MLPs, and which
# step its retrieval skills "clicked" at depended on the seed and on the float
# rounding of the machine (issue 40). Real-size runs load their weights.
# Weights are drawn in float32 whatever the config's `param_dtype`, then held
# in it (nn/shapes.py `held_in`): a bf16 run starts from its float32 twin's
# weights, rounded.
DRAW_DTYPE = jnp.float32
default_kernel_init = nn.initializers.lecun_normal()
# Token tables: N(0, 1/width) (Flax's Embed default).
embedding_init = nn.linear.default_embed_init


def logical(init, axes: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features, in_axis: str, out_axes: Sequence[str], *, use_bias: bool, dtype, name: str | None = None, axis=-1
) -> nn.DenseGeneral:
    """DenseGeneral with logical axis names on its kernel and bias."""
    in_axes = (in_axis,) if isinstance(in_axis, str) else tuple(in_axis)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=DRAW_DTYPE,
        kernel_init=logical(default_kernel_init, in_axes + tuple(out_axes)),
        bias_init=logical(nn.initializers.zeros, tuple(out_axes)),
        name=name,
    )


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (x.shape[-1],), DRAW_DTYPE)
        # Normalize in fp32 whatever the compute dtype: bf16 mean-of-squares loses too much.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(
            epsilon=self.eps,
            dtype=self.dtype,
            param_dtype=DRAW_DTYPE,
            scale_init=logical(nn.initializers.ones, (self.axis_name,)),
            bias_init=logical(nn.initializers.zeros, (self.axis_name,)),
            name="norm",
        )(x)


class SwiGLU(nn.Module):
    """LLaMA FFN: down(silu(gate(x)) * up(x))."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B N D"]) -> Float[Array, "B N D"]:
        gate = dense(self.hidden, "embed", ("mlp",), use_bias=False, dtype=self.dtype, name="gate")(x)
        up = dense(self.hidden, "embed", ("mlp",), use_bias=False, dtype=self.dtype, name="up")(x)
        return dense(x.shape[-1], "mlp", ("embed",), use_bias=False, dtype=self.dtype, name="down")(nn.silu(gate) * up)


def llama3_inv_freq(inv_freq: Float[Array, " F"], scaling: tuple[float, float, float, int]) -> Float[Array, " F"]:
    """Llama 3.1's frequency scaling: wavelengths longer than the original
    context / low_freq_factor are stretched by `factor`, those shorter than
    original / high_freq_factor kept, the ones between interpolated smoothly."""
    factor, low_freq_factor, high_freq_factor, original = scaling
    wavelength = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelength > original / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high_freq_factor) & (wavelength <= original / low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(
    positions: Int[Array, "B L"],
    head_dim: int,
    theta: float,
    llama3_scaling: tuple[float, float, float, int] | None = None,
) -> tuple[Float[Array, "B L 1 Dh"], Float[Array, "B L 1 Dh"]]:
    """cos/sin for rotary embeddings, Hugging Face Llama convention (halves, not interleaved)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if llama3_scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, llama3_scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B L H Dh"], cos, sin) -> Float[Array, "B L H Dh"]:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
