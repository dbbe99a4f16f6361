"""CLIP-compatible ViT vision tower (pre-LN, class token, learned positions)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from skipvision_jax.config import VisionConfig
from skipvision_jax.nn.attention import Attention, attend, attention_probs
from skipvision_jax.nn.layers import DRAW_DTYPE, LayerNorm, dense, logical

# The tower's embeddings start as CLIP's do (transformers' CLIPVisionEmbeddings
# init): the patch embedding and a learned position table N(0, 0.02), the class
# token N(0, 1/sqrt(width)). At fan-in scale instead, an object's content made
# 95% of its token's variance at the start and its position 4% (33% this way),
# and relative position was the last kind the embedded task learnt (issue 40).
clip_embedding_init = nn.initializers.normal(stddev=0.02)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class VisionBlock(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(
        self, x: Float[Array, "B N W"], with_cls_attention: bool = False
    ) -> Float[Array, "B N W"] | tuple[Float[Array, "B N W"], Float[Array, "B P"]]:
        """The block; with `with_cls_attention` also the attention the class
        token pays each patch in this block, the mean over heads [B, N - 1]."""
        cfg = self.cfg
        head_dim = cfg.width // cfg.num_heads
        attn = Attention(
            cfg.width,
            cfg.num_heads,
            cfg.num_heads,
            head_dim,
            rope_theta=None,
            use_bias=True,
            dtype=self.dtype,
            name="attn",
        )
        normed = LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln1")(x)
        q, k, v = attn.project(normed, None)
        cls_attention = None
        if with_cls_attention:
            everything = jnp.ones((x.shape[0], 1, 1, x.shape[1]), bool)
            cls_attention = attention_probs(q[:, :1], k, everything)[:, :, 0, 1:].mean(axis=1)
        x = x + attn.output(attend(q, k, v, None))
        act = quick_gelu if cfg.quick_gelu else (lambda y: nn.gelu(y, approximate=False))
        y = LayerNorm(cfg.layer_norm_eps, self.dtype, name="ln2")(x)
        y = dense(cfg.mlp_dim, "embed", ("mlp",), use_bias=True, dtype=self.dtype, name="fc1")(y)
        y = dense(cfg.width, "mlp", ("embed",), use_bias=True, dtype=self.dtype, name="fc2")(act(y))
        return (x + y, cls_attention) if with_cls_attention else x + y


class VisionTower(nn.Module):
    """pixels [B, H, W, C] (CLIP-normalized) -> selected hidden state [B, N, W].

    Only the layers up to `select_layer` are built and run: the ones after it
    cannot change the LLaVA feature.
    """

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, pixels: Float[Array, "B H W C"], with_cls_attention: bool = False
    ) -> Float[Array, "B N W"] | tuple[Float[Array, "B N W"], Float[Array, "B P"]]:
        """The features; with `with_cls_attention` also the class token's
        attention to each patch inside the feature layer (the layer whose
        output is the feature), mean over heads (VisionZip's ranking)."""
        cfg = self.cfg
        patches = nn.Conv(
            cfg.width,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=DRAW_DTYPE,
            kernel_init=logical(clip_embedding_init, (None, None, None, "embed")),
            name="patch_embed",
        )(pixels.astype(self.dtype))
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.width)
        class_init = nn.initializers.normal(stddev=cfg.width**-0.5)
        cls = self.param("class_embed", logical(class_init, ("embed",)), (cfg.width,), DRAW_DTYPE)
        pos_init = sincos2d_init(cfg.patch_grid) if cfg.pos_embed_init == "sincos2d" else clip_embedding_init
        pos = self.param("pos_embed", logical(pos_init, (None, "embed")), (cfg.num_patches + 1, cfg.width), DRAW_DTYPE)
        x = jnp.concatenate(
            [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, cfg.width)), patches], axis=1
        ) + pos.astype(self.dtype)
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="pre_norm")(x)
        cls_attention = None
        for i in range(cfg.layers_used):
            block = VisionBlock(cfg, self.dtype, name=f"layer_{i}")
            if with_cls_attention and i == cfg.layers_used - 1:
                x, cls_attention = block(x, with_cls_attention=True)
            else:
                x = block(x)
        cls, patches = x[:, :1], x[:, 1:]
        tokens = [pool_grid(patches, cfg.patch_grid, grid) for grid in cfg.pooled_grids] + [patches]
        if cfg.select_strategy == "full":
            tokens.insert(0, cls)
        features = jnp.concatenate(tokens, axis=1)
        return (features, cls_attention) if with_cls_attention else features


def sincos2d_init(grid: int):
    """Initializer of a [1 + grid * grid, W] position table: zeros for the class
    token, then per patch sin/cos of its row (first half of W) and column
    (second half) at geometric frequencies (MAE's 2-D table)."""

    def init(key, shape, dtype=jnp.float32):
        width = shape[-1]
        quarter = width // 4
        omega = 1.0 / 10000 ** (jnp.arange(quarter, dtype=jnp.float32) / max(quarter, 1))
        rows, cols = jnp.meshgrid(
            jnp.arange(grid, dtype=jnp.float32), jnp.arange(grid, dtype=jnp.float32), indexing="ij"
        )
        angles = lambda coord: coord.reshape(-1, 1) * omega[None]
        table = jnp.concatenate(
            [jnp.sin(angles(rows)), jnp.cos(angles(rows)), jnp.sin(angles(cols)), jnp.cos(angles(cols))], axis=1
        )
        table = jnp.pad(table, [(1, 0), (0, width - table.shape[1])])  # class token row, odd widths
        return table.astype(dtype)

    return init


def pool_grid(patches: Float[Array, "B N W"], side: int, grid: int) -> Float[Array, "B G W"]:
    """Average-pools the side x side patch grid to grid x grid tokens (row-major)."""
    batch, _, width = patches.shape
    block = side // grid
    x = patches.reshape(batch, grid, block, grid, block, width)
    return x.mean(axis=(2, 4)).reshape(batch, grid * grid, width)
