"""Projector (2-layer GELU MLP), token merge and the summary tokens q1/q2."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from skipvision_jax.config import ModelConfig
from skipvision_jax.nn.layers import LayerNorm, dense
from skipvision_jax.nn.token_merge import merge_tokens


class Projector(nn.Module):
    """LLaVA's multi-modal projector: Linear -> GELU -> Linear."""

    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Float[Array, "B N W"]) -> Float[Array, "B N D"]:
        # Column- then row-parallel under tensor parallelism (the hidden is `mlp`).
        x = dense(self.width, "vision_embed", ("mlp",), use_bias=True, dtype=self.dtype, name="linear_1")(features)
        return dense(self.width, "mlp", ("embed",), use_bias=True, dtype=self.dtype, name="linear_2")(
            nn.gelu(x, approximate=False)
        )


class SummaryPool(nn.Module):
    """One summary token: softmax-weighted pool, score = Linear(LayerNorm(x))."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "B N D"]) -> Float[Array, "B 1 D"]:
        score = dense(1, "embed", (None,), use_bias=True, dtype=jnp.float32, name="score")(
            LayerNorm(dtype=jnp.float32, name="norm")(x)
        )
        weights = jax.nn.softmax(score[..., 0], axis=-1)
        return jnp.einsum("bn,bnd->bd", weights, x.astype(jnp.float32))[:, None].astype(x.dtype)


class VisualTokens(nn.Module):
    """Vision features -> the visual block `[kept | q1 | skipped | q2]` of the decoder sequence."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Float[Array, "B N W"]) -> Float[Array, "B V D"]:
        cfg = self.cfg
        if cfg.layout.drop_fine:  # not even projected
            features = features[:, : cfg.layout.num_kept]
        tokens = Projector(cfg.decoder.width, self.dtype, name="projector")(features)
        kept, fine = tokens[:, : cfg.layout.num_kept], tokens[:, cfg.layout.num_kept :]
        if cfg.layout.merge_to is not None:
            fine = merge_tokens(fine, cfg.layout.merge_to, cfg.layout.merge_method)
        if not cfg.layout.summary_tokens:
            return jnp.concatenate([kept, fine], axis=1)
        if cfg.layout.summary_pool == "shared":  # the official model's one `ada` pool
            pool = SummaryPool(self.dtype, name="summary")
            q1, q2 = pool(kept), pool(fine)
        else:
            q1 = SummaryPool(self.dtype, name="summary_kept")(kept)
            q2 = SummaryPool(self.dtype, name="summary_skipped")(fine)
        return jnp.concatenate([kept, q1, fine, q2], axis=1)
