"""Static-shape token partitions for Skip-FFN.

The decoder sequence is laid out as

    [ prefix (P) | kept (K) | q1 | skipped (S) | q2 | text (T - P) ]

and every Skip-FFN layer splits it into R retained rows (run the FFN) and
S skipped rows (attention only). R and S are Python ints known at trace time;
what varies at run time is at most *which* rows are retained (the `topk`
kind), expressed as an index array of static shape `[B, R]`.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax.config import ModelConfig


def in_range(positions: Int[Array, ...], bounds: tuple[int, int]) -> Bool[Array, ...]:
    """Whether each sequence position lies in [start, end) (e.g. `SequenceLayout.skipped_range`)."""
    start, end = bounds
    return (positions >= start) & (positions < end)


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Static positions of every segment of the decoder sequence."""

    prefix: int
    kept: int
    skipped: int
    summary_tokens: bool
    text: int  # all text tokens, prefix included

    @classmethod
    def from_config(cls, cfg: ModelConfig, num_text: int) -> SequenceLayout:
        if cfg.layout.image_offset > num_text:
            raise ValueError(f"layout.image_offset: {cfg.layout.image_offset} exceeds the {num_text} text tokens")
        return cls(cfg.layout.image_offset, cfg.layout.num_kept, cfg.num_skipped, cfg.layout.summary_tokens, num_text)

    def pruned(self, visual_rows: int) -> SequenceLayout:
        """The sequence after a pruner (FastV) kept `visual_rows` of the visual block."""
        return SequenceLayout(self.prefix, visual_rows, 0, False, self.text)

    def for_length(self, length: int) -> SequenceLayout:
        """The same visual layout in a sequence of `length` rows (text count derived)."""
        return dataclasses.replace(self, text=length - self.visual_length)

    @property
    def visual_start(self) -> int:
        return self.prefix

    @property
    def q1_index(self) -> int:
        return self.prefix + self.kept

    @property
    def skipped_start(self) -> int:
        return self.prefix + self.kept + int(self.summary_tokens)

    @property
    def skipped_end(self) -> int:
        return self.skipped_start + self.skipped

    @property
    def skipped_range(self) -> tuple[int, int]:
        """[start, end) of the skipped segment."""
        return self.skipped_start, self.skipped_end

    @property
    def q2_index(self) -> int:
        return self.skipped_end

    @property
    def visual_end(self) -> int:
        return self.skipped_end + int(self.summary_tokens)

    def text_sees_skipped_mask(self) -> np.ndarray:
        """[L, L] (query, key): False where a row after q2 (text, answer) would
        read a skipped row (model.skip.text_sees_skipped=False)."""
        mask = np.ones((self.length, self.length), bool)
        mask[self.visual_end :, self.skipped_start : self.skipped_end] = False
        return mask

    @property
    def visual_length(self) -> int:
        return self.visual_end - self.visual_start

    @property
    def length(self) -> int:
        return self.visual_end + (self.text - self.prefix)

    @property
    def num_retained(self) -> int:
        return self.length - self.skipped

    def key_valid(self, text_mask: Bool[Array, "B T"]) -> Bool[Array, "B L"]:
        """Which sequence rows are real tokens: visual rows always, text rows per `text_mask`."""
        visual = jnp.ones((text_mask.shape[0], self.visual_length), bool)
        return jnp.concatenate([text_mask[:, : self.prefix], visual, text_mask[:, self.prefix :]], axis=1)

    def text_positions(self) -> np.ndarray:
        """Sequence index of every text token, in text order. [T]"""
        return np.concatenate([np.arange(self.prefix), np.arange(self.visual_end, self.length)])

    def routable_positions(self) -> np.ndarray:
        """Visual tokens a score-based partition chooses among (summaries excluded). [K + S]"""
        return np.concatenate(
            [
                np.arange(self.visual_start, self.visual_start + self.kept),
                np.arange(self.skipped_start, self.skipped_end),
            ]
        )

    def always_retained_positions(self) -> np.ndarray:
        """Rows that run the FFN under every partition: text and summaries."""
        summaries = [self.q1_index, self.q2_index] if self.summary_tokens else []
        return np.concatenate(
            [np.arange(self.prefix), np.asarray(summaries, dtype=np.int64), np.arange(self.visual_end, self.length)]
        )


@dataclasses.dataclass(frozen=True)
class SlicePartition:
    """The positional partition: one static skipped range `[start, end)`.

    Gather and scatter are static slices and concatenations, which XLA turns
    into copies (no gather/scatter ops, cheap gradients).
    """

    start: int
    end: int
    gate = None

    def gather(self, h: Float[Array, "B L D"]) -> Float[Array, "B R D"]:
        return jnp.concatenate([h[:, : self.start], h[:, self.end :]], axis=1)

    def scatter(self, h: Float[Array, "B L D"], retained: Float[Array, "B R D"]) -> Float[Array, "B L D"]:
        return jnp.concatenate(
            [retained[:, : self.start], h[:, self.start : self.end], retained[:, self.start :]], axis=1
        )


@flax.struct.dataclass
class IndexPartition:
    """A score-based partition: the retained rows of each example, sorted."""

    retained_idx: Int[Array, "B R"]
    # Multiplies the FFN update of each retained row, so that the router that
    # chose the rows learns from the loss (mixture-of-depths style).
    gate: Float[Array, "B R"]

    def gather(self, h: Float[Array, "B L D"]) -> Float[Array, "B R D"]:
        return jnp.take_along_axis(h, self.retained_idx[:, :, None], axis=1)

    def scatter(self, h: Float[Array, "B L D"], retained: Float[Array, "B R D"]) -> Float[Array, "B L D"]:
        batch_idx = jnp.arange(h.shape[0])[:, None]
        return h.at[batch_idx, self.retained_idx].set(retained, indices_are_sorted=True, unique_indices=True)


Partition = SlicePartition | IndexPartition


def positional_partition(layout: SequenceLayout) -> SlicePartition:
    """The paper's partition: every row but the skipped segment is retained."""
    return SlicePartition(layout.skipped_start, layout.skipped_end)


def topk_partition(layout: SequenceLayout, router_logits: Float[Array, "B V"]) -> IndexPartition:
    """Keeps the `layout.kept` highest-scoring visual tokens (of K + S routable ones).

    `router_logits[:, i]` scores `layout.routable_positions()[i]`. The retained
    index is sorted so that `scatter` writes rows in order; the gate is
    sigmoid(score) on routed rows and 1 on text and summary rows.
    """
    batch = router_logits.shape[0]
    routable = jnp.asarray(layout.routable_positions(), dtype=jnp.int32)
    top_scores, top = jax.lax.top_k(router_logits, layout.kept)  # [B, K]
    always = jnp.broadcast_to(
        jnp.asarray(layout.always_retained_positions(), dtype=jnp.int32), (batch, layout.num_retained - layout.kept)
    )
    idx = jnp.concatenate([routable[top], always], axis=1)
    gate = jnp.concatenate([jax.nn.sigmoid(top_scores), jnp.ones(always.shape, router_logits.dtype)], axis=1)
    order = jnp.argsort(idx, axis=1)
    return IndexPartition(
        retained_idx=jnp.take_along_axis(idx, order, axis=1), gate=jnp.take_along_axis(gate, order, axis=1)
    )


def kept_first_order(scores: Float[Array, "B N"], num_kept: int) -> Int[Array, "B N"]:
    """A permutation of the N visual tokens: the `num_kept` highest-scoring in
    image order, then the rest in image order (static top-k)."""
    batch, n = scores.shape
    _, top = jax.lax.top_k(scores, num_kept)
    kept = jnp.zeros((batch, n), bool).at[jnp.arange(batch)[:, None], top].set(True)
    index = jnp.arange(n)
    return jnp.argsort(jnp.where(kept, index, index + n), axis=1).astype(jnp.int32)
