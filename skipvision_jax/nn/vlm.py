"""The LLaVA-style vision-language model with Skip-FFN."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax.config import ModelConfig
from skipvision_jax.kvcache import KVPolicy, LayerCache
from skipvision_jax.nn.attention import causal_mask
from skipvision_jax.nn.decoder import DecoderStack
from skipvision_jax.nn.layers import DRAW_DTYPE, RMSNorm, dense, embedding_init, logical
from skipvision_jax.nn.projector import VisualTokens
from skipvision_jax.nn.vision import VisionTower
from skipvision_jax.partition import SequenceLayout, in_range, kept_first_order
from skipvision_jax.presses import ScoredQueries
from skipvision_jax.sharding import HIDDEN_ACTIVATION, constrain, logits_axes


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


class SkipVisionVLM(nn.Module):
    """vision tower -> projector (+ merge, summaries) -> decoder with Skip-FFN.

    The visual block is inserted after the first `layout.image_offset` text
    tokens; the sequence layout is static, so every partition is too.
    """

    cfg: ModelConfig

    def setup(self):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        self.vision = VisionTower(cfg.vision, dtype)
        self.visual_tokens = VisualTokens(cfg, dtype)
        self.embed = nn.Embed(
            cfg.decoder.vocab_size,
            cfg.decoder.width,
            dtype=dtype,
            param_dtype=DRAW_DTYPE,
            embedding_init=logical(embedding_init, ("vocab", "embed")),
        )
        self.decoder = DecoderStack(
            cfg.decoder,
            self.layout(cfg.layout.image_offset),
            cfg.skip_layers,
            cfg.skip.partition,
            dtype,
            remat=cfg.remat_policy if cfg.remat else None,
            scan_layers=cfg.scan_layers,
            fastv=cfg.fastv,
        )
        self.final_norm = RMSNorm(cfg.decoder.norm_eps, dtype)
        if not cfg.decoder.tie_embeddings:
            self.lm_head = dense(
                cfg.decoder.vocab_size, "embed", ("vocab",), use_bias=False, dtype=dtype, name="lm_head"
            )

    def layout(self, num_text: int) -> SequenceLayout:
        return SequenceLayout.from_config(self.cfg, num_text)

    def encode_images(self, pixels: Float[Array, "B H W C"]) -> Float[Array, "B N W"]:
        """The tower's features; under `layout.select="cls_attention"` reordered
        so that the kept tokens (top `num_kept` by CLS attention, in image
        order) come first and the fine ones follow in image order."""
        if self.cfg.layout.select == "first":
            return self.vision(pixels)
        features, cls_attention = self.vision(pixels, with_cls_attention=True)
        order = kept_first_order(cls_attention, self.cfg.layout.num_kept)
        return jnp.take_along_axis(features, order[:, :, None], axis=1)

    def embed_sequence(
        self, input_ids: Int[Array, "B T"], text_mask: Bool[Array, "B T"], features: Float[Array, "B N W"]
    ):
        """Builds the decoder input `[prefix | visual block | rest of text]`.

        Returns h [B, L, D] and key_valid [B, L] (False on text padding).
        """
        layout = self.layout(input_ids.shape[1])
        visual = self.visual_tokens(features)  # [B, V, D]
        text = self.embed(input_ids)
        p = layout.prefix
        h = jnp.concatenate([text[:, :p], visual, text[:, p:]], axis=1)
        return constrain(h, HIDDEN_ACTIVATION), layout.key_valid(text_mask)

    def logits(self, h: Float[Array, "B N D"]) -> Float[Array, "B N V"]:
        h = self.final_norm(h)
        logits = self.embed.attend(h) if self.cfg.decoder.tie_embeddings else self.lm_head(h)
        return constrain(logits.astype(jnp.float32), logits_axes(logits.ndim))

    def hidden_states(
        self, input_ids, text_mask, pixels, vision_features, extra_mask=None, scored=None, fastv_query=None
    ):
        """Final hidden states [B, M, D] (before the norm; M = L unless FastV pruned) and key_valid [B, L]."""
        if (pixels is None) == (vision_features is None):
            raise ValueError("pass exactly one of pixels or vision_features")
        if vision_features is not None and self.cfg.layout.select != "first":
            raise ValueError(
                "layout.select: cls_attention ranks the tower's attention; pass pixels, not vision_features"
            )
        features = self.encode_images(pixels) if vision_features is None else vision_features
        h, key_valid = self.embed_sequence(input_ids, text_mask, features)
        positions = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32), h.shape[:2])
        mask = causal_mask(key_valid)
        if not self.cfg.skip.text_sees_skipped:
            mask = mask & self.layout(input_ids.shape[1]).text_sees_skipped_mask()[None, None]
        if extra_mask is not None:
            mask = mask & extra_mask[:, None]
        return self.decoder(h, positions, mask, scored, fastv_query), key_valid

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        text_mask: Bool[Array, "B T"],
        pixels: Float[Array, "B H W C"] | None = None,
        vision_features: Float[Array, "B N W"] | None = None,
        extra_mask: Bool[Array, "B L L"] | None = None,
    ) -> Float[Array, "B T V"]:
        """Logits at the text positions only (visual rows carry no labels).

        Pass `pixels`, or precomputed `vision_features` to bypass the tower.
        `extra_mask` (query, key) is AND-ed with the causal mask: a hook for
        reference computations such as decoding without the skipped keys.
        """
        if self.cfg.fastv.enabled:
            raise ValueError(
                "fastv: FastV pruning applies at prefill (decoding) only; train and score the plain model, then decode with fastv set"
            )
        h, _ = self.hidden_states(input_ids, text_mask, pixels, vision_features, extra_mask)
        return self.logits(h[:, self.layout(input_ids.shape[1]).text_positions()])

    def decode_step(
        self,
        tokens: Int[Array, "B 1"],
        positions: Int[Array, "B 1"],
        caches: tuple[LayerCache, ...],
        policy: KVPolicy,
    ) -> tuple[Float[Array, "B V"], tuple[LayerCache, ...]]:
        """One new token per row at its `positions`, against the caches that
        prefill built (one per `DecoderStack.groups()` entry): its logits and
        the updated caches."""
        h, caches = self.decoder(self.embed(tokens), positions, caches=caches, policy=policy)
        return self.logits(h[:, 0]), caches

    def prefill_prefix(self, prefix_ids: Int[Array, "U P"], pixels=None, vision_features=None) -> None:
        """The forward of prompts' shared prefix: the text before the image and
        the visual block (the rows [0, visual_end) of every prompt with this
        image and prefix text; under causal attention they do not depend on
        what follows). Apply with mutable=["prefill", PREFIX_QUERIES] to
        collect each layer's keys, values and queries for `extend`."""
        if not self.cfg.shares_prefixes:
            raise ValueError("fastv: a pruned prefix depends on the question; prefixes are not shared under FastV")
        self.hidden_states(prefix_ids, jnp.ones(prefix_ids.shape, bool), pixels, vision_features)

    def extend(
        self,
        input_ids: Int[Array, "B T"],
        text_mask: Bool[Array, "B T"],
        prefixes: tuple[dict[str, Array], ...],
        scored: ScoredQueries | None = None,
    ) -> Float[Array, "B V"]:
        """The rest of each prompt after its shared prefix (`prefill_prefix`'s
        captures gathered to the rows), as a full `prefill` computes it: the
        logits after each row's last real token. Apply with mutable=["prefill"]
        to collect what a full prefill collects."""
        layout = self.layout(input_ids.shape[1])
        rest_ids, rest_mask = input_ids[:, layout.prefix :], text_mask[:, layout.prefix :]
        start, length = layout.visual_end, rest_ids.shape[1]
        positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), rest_ids.shape)
        prefix_keys = jnp.ones((start,), bool)
        if not self.cfg.skip.text_sees_skipped:  # every row here is after q2
            prefix_keys = ~in_range(jnp.arange(start), layout.skipped_range)
        own = jnp.tril(jnp.ones((length, length), bool))[None] & rest_mask[:, None, :]  # [B, T, T]
        seen = jnp.broadcast_to(prefix_keys[None, None], (rest_ids.shape[0], length, start))
        mask = jnp.concatenate([seen, own], axis=2)[:, None]  # [B, 1, T, L]
        h = self.decoder(self.embed(rest_ids), positions, mask, scored, prefixes=prefixes)
        last = rest_mask.sum(axis=1) - 1
        return self.logits(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])

    def prefill(self, input_ids, text_mask, pixels=None, vision_features=None, scored=None):
        """Prompt forward for decoding (Skip-FFN path, as trained). Apply with
        mutable=["prefill"] to collect each layer's keys, values and key scores.

        With `cfg.fastv` the visual rows are pruned after layer `fastv.layer`,
        ranked by the attention of each row's last prompt token.

        Returns the logits after each row's last real token [B, V]."""
        layout = self.layout(input_ids.shape[1])
        last_text = text_mask.sum(axis=1) - 1  # [B]
        fastv_query = jnp.asarray(layout.text_positions())[last_text] if self.cfg.fastv.enabled else None
        h, _ = self.hidden_states(input_ids, text_mask, pixels, vision_features, scored=scored, fastv_query=fastv_query)
        if self.cfg.fastv.enabled:
            layout = layout.pruned(self.cfg.fastv.keep)
        last = jnp.asarray(layout.text_positions())[last_text]
        return self.logits(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
