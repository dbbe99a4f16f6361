"""LLaMA-style decoder whose blocks can skip the FFN for a static share of rows."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax import kvcache
from skipvision_jax.config import DecoderConfig, FastVConfig
from skipvision_jax.kvcache import KVPolicy, LayerCache
from skipvision_jax.nn.attention import (
    Attention,
    attend,
    attend_cache,
    attention_probs,
    received_attention,
)
from skipvision_jax.nn.layers import RMSNorm, SwiGLU, dense
from skipvision_jax.partition import (
    Partition,
    SequenceLayout,
    positional_partition,
    topk_partition,
)
from skipvision_jax.presses import ScoredQueries
from skipvision_jax.sharding import HIDDEN_ACTIVATION, constrain

# Collections a prefill makes mutable to ask the blocks for more in "prefill"
# beside k and v: the query states before RoPE (a press that reads them), and
# the queries after RoPE (a shared prefix, whose queries' attention a press may
# read once the rest of the prompt is in).
QUERY_STATES = "query_states"
PREFIX_QUERIES = "prefix_queries"


class DecoderBlock(nn.Module):
    """Pre-norm block. With a `layout`, it is a Skip-FFN block: every row takes
    part in attention, but only the R retained rows (gathered, `[B, R, D]`) run
    the FFN; skipped rows leave as `h + attn(norm(h))`."""

    cfg: DecoderConfig
    layout: SequenceLayout | None = None
    partition_kind: str = "positional"
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        self.attn_norm = RMSNorm(cfg.norm_eps, self.dtype)
        self.attn = Attention(
            cfg.width,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.resolved_head_dim,
            cfg.rope_theta,
            cfg.rope_llama3_scaling,
            use_bias=False,
            dtype=self.dtype,
        )
        self.mlp_norm = RMSNorm(cfg.norm_eps, self.dtype)
        self.mlp = SwiGLU(cfg.mlp_dim, self.dtype)
        if self.layout is not None and self.partition_kind == "topk":
            self.router = dense(1, "embed", (None,), use_bias=False, dtype=jnp.float32)

    def ffn(self, h: Float[Array, "B N D"]) -> Float[Array, "B N D"]:
        return self.mlp(self.mlp_norm(h))

    def partition(self, h: Float[Array, "B L D"]) -> Partition:
        layout = self.layout.for_length(h.shape[1])
        if self.partition_kind == "positional":
            return positional_partition(layout)
        routable = h[:, layout.routable_positions()]
        return topk_partition(layout, self.router(routable)[..., 0])

    def __call__(
        self,
        h: Float[Array, "B L D"],
        positions: Int[Array, "B L"],
        mask: Bool[Array, "B 1 L L"],
        scored: ScoredQueries | None = None,
    ) -> Float[Array, "B L D"]:
        q, k, v, query_states = self.attn.project_with_states(self.attn_norm(h), positions)
        if self.is_mutable_collection("prefill"):
            # Prefill for decoding: hand the keys and values (RoPE applied) to the
            # KV cache, and the attention each key received from the scored
            # queries, per query head, but only for the policies that rank by it.
            self.sow("prefill", "k", k)
            self.sow("prefill", "v", v)
            if self.is_mutable_collection(QUERY_STATES):
                self.sow("prefill", "query_states", query_states)
            if self.is_mutable_collection(PREFIX_QUERIES):
                self.sow("prefill", "q", q)
            if scored is not None:
                if scored.index is None:  # every row, causal
                    received = received_attention(q, k, mask, scored.weights, causal_offset=0)
                else:  # only the rows the press reads
                    rows_q = jnp.take_along_axis(q, scored.index[:, :, None, None], axis=1)
                    rows_mask = jnp.take_along_axis(mask, scored.index[:, None, :, None], axis=2)
                    received = received_attention(rows_q, k, rows_mask, scored.weights)
                self.sow("prefill", "key_scores", received)
        h = h + self.attn.output(attend(q, k, v, mask, causal_offset=0))
        if self.layout is None:
            return h + self.ffn(h)
        partition = self.partition(h)
        retained = partition.gather(h)  # [B, R, D]
        update = self.ffn(retained)
        if partition.gate is not None:
            update = update * partition.gate[..., None].astype(update.dtype)
        return partition.scatter(h, retained + update)

    def extend(
        self,
        h: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        mask: Bool[Array, "B 1 T L"],
        prefix: dict[str, Array],
        scored: ScoredQueries | None = None,
    ) -> Float[Array, "B T D"]:
        """The prompt's rows after a shared prefix (text rows: the FFN runs on
        all), attending over the prefix's keys and values and their own; what
        a full prefill computes for them. `prefix` holds the prefix's `k`,
        `v` and queries `q` (RoPE applied) and maybe `query_states`, [B, P, ...].
        Sows what a full prefill sows for the whole prompt of L = P + T rows."""
        q, k, v, query_states = self.attn.project_with_states(self.attn_norm(h), positions)
        keys = jnp.concatenate([prefix["k"], k.astype(prefix["k"].dtype)], axis=1)
        values = jnp.concatenate([prefix["v"], v.astype(prefix["v"].dtype)], axis=1)
        self.sow("prefill", "k", keys)
        self.sow("prefill", "v", values)
        if self.is_mutable_collection(QUERY_STATES):
            self.sow("prefill", "query_states", jnp.concatenate([prefix["query_states"], query_states], axis=1))
        if scored is not None:
            # Attention received from the scored queries, each a prefix row
            # (causal among the prefix's rows, all real) or one of the rest's.
            length, total = prefix["k"].shape[1], keys.shape[1]
            index = scored.index
            if index is None:
                index = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), scored.weights.shape)
            rows_q = jnp.take_along_axis(
                jnp.concatenate([prefix["q"], q.astype(prefix["q"].dtype)], axis=1), index[:, :, None, None], axis=1
            )
            own_rows = jnp.take_along_axis(mask[:, 0], jnp.clip(index - length, 0)[:, :, None], axis=1)
            prefix_rows = jnp.arange(total)[None, None] <= index[:, :, None]
            rows_mask = jnp.where((index < length)[:, :, None], prefix_rows, own_rows)[:, None]
            self.sow("prefill", "key_scores", received_attention(rows_q, keys, rows_mask, scored.weights))
        h = h + self.attn.output(attend(q, keys, values, mask, causal_offset=prefix["k"].shape[1]))
        return h + self.ffn(h)

    def attention_received(
        self,
        h: Float[Array, "B L D"],
        positions: Int[Array, "B L"],
        mask: Bool[Array, "B 1 L L"],
        query_index: Int[Array, " B"],
    ) -> Float[Array, "B L"]:
        """Attention each key gets from row `query_index` of its example, the
        mean over heads, as this block computes it on input `h` (FastV's ranking)."""
        q, k, _ = self.attn.project(self.attn_norm(h), positions)
        query = jnp.take_along_axis(q, query_index[:, None, None, None], axis=1)  # [B, 1, H, Dh]
        query_mask = jnp.take_along_axis(mask, query_index[:, None, None, None], axis=2)  # [B, 1, 1, L]
        return attention_probs(query, k, query_mask).mean(axis=(1, 2))

    def decode(
        self, h: Float[Array, "B 1 D"], positions: Int[Array, "B 1"], cache: LayerCache, policy: KVPolicy
    ) -> tuple[Float[Array, "B 1 D"], LayerCache]:
        """One new token per row against the layer's fixed-budget cache."""
        q, k, v = self.attn.project(self.attn_norm(h), positions)
        cache = kvcache.insert(cache, policy, k[:, 0], v[:, 0], positions[:, 0])
        o, probs = attend_cache(q, cache.k, cache.v, cache.valid)  # probs [B, H, 1, S]
        if policy.observes:
            cache = kvcache.observe(cache, policy, probs)
        h = h + self.attn.output(o)
        return h + self.ffn(h), cache


def remat_block(policy: str | None, scanned: bool) -> type[DecoderBlock]:
    """DecoderBlock, rematerialized under the named policy when one is given.
    Inside a scan the loop already keeps XLA from merging the recomputation
    into the forward pass, so CSE prevention is off there (flax's advice)."""
    if policy is None:
        return DecoderBlock
    return nn.remat(DecoderBlock, prevent_cse=not scanned, policy=getattr(jax.checkpoint_policies, policy))


class _ScanStep(nn.Module):
    """Adapts DecoderBlock to nn.scan's (carry, *broadcast) -> (carry, out) form."""

    cfg: DecoderConfig
    layout: SequenceLayout | None
    partition_kind: str
    dtype: jnp.dtype
    remat: str | None

    @nn.compact
    def __call__(self, h, positions, mask, scored):
        block_cls = remat_block(self.remat, scanned=True)
        block = block_cls(self.cfg, self.layout, self.partition_kind, self.dtype, name="block")
        return constrain(block(h, positions, mask, scored), HIDDEN_ACTIVATION), None


class _ScanDecodeStep(nn.Module):
    """One scanned layer's decode step. The segment's caches, stacked on a
    leading layers axis, ride in the carry with the layer index: each layer
    reads its slice and writes it back with dynamic_update_slice, which XLA
    does in place (scanning the caches as xs/ys would write a second buffer)."""

    cfg: DecoderConfig
    dtype: jnp.dtype
    policy: KVPolicy

    @nn.compact
    def __call__(self, carry, positions):
        h, caches, index = carry
        cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, index, keepdims=False), caches)
        h, cache = DecoderBlock(self.cfg, None, dtype=self.dtype, name="block").decode(h, positions, cache, self.policy)
        caches = jax.tree.map(lambda c, new: jax.lax.dynamic_update_index_in_dim(c, new, index, 0), caches, cache)
        return (h, caches, index + 1), None


class _ScanExtendStep(nn.Module):
    """One scanned layer of `DecoderBlock.extend`; the prefix's captures ride as the scanned input."""

    cfg: DecoderConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, h, positions, mask, scored, prefix):
        block = DecoderBlock(self.cfg, None, dtype=self.dtype, name="block")
        return constrain(block.extend(h, positions, mask, prefix, scored), HIDDEN_ACTIVATION), None


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Layers [start, end) that share a parameter (and KV cache) entry: one
    unrolled layer `layer_{start}`, or a scanned segment `layers_{start}_{end}`
    whose weights and caches are stacked on a leading layers axis."""

    start: int
    end: int
    skip: bool  # a Skip-FFN segment
    scanned: bool

    @property
    def name(self) -> str:
        return f"layers_{self.start}_{self.end}" if self.scanned else f"layer_{self.start}"

    @property
    def rows_axis(self) -> int:
        """The batch rows' axis in this group's caches and captures (after the layers axis when scanned)."""
        return 1 if self.scanned else 0


def layer_groups(num_layers: int, skip_layers: range, scan_layers: bool) -> list[LayerGroup]:
    """The decoder's layers in up to three contiguous segments (plain,
    Skip-FFN, plain), each one group when scanned, one group per layer if not."""
    start, end = (skip_layers.start, skip_layers.stop) if len(skip_layers) else (num_layers, num_layers)
    segments = [
        (a, b, skip) for a, b, skip in [(0, start, False), (start, end, True), (end, num_layers, False)] if b > a
    ]
    if scan_layers:
        return [LayerGroup(a, b, skip, True) for a, b, skip in segments]
    return [LayerGroup(i, i + 1, skip, False) for a, b, skip in segments for i in range(a, b)]


def scan_group(step_cls: type[nn.Module], group: LayerGroup, num_broadcast: int, num_scanned: int = 0):
    """`step_cls` scanned over a scanned group's layers: weights (and what the
    blocks sow at prefill) on a leading `layers` axis, the `num_broadcast`
    arguments after the carry the same for every layer, the `num_scanned`
    after those one slice per layer."""
    return nn.scan(
        step_cls,
        variable_axes={"params": 0, "prefill": 0, QUERY_STATES: 0, PREFIX_QUERIES: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_scanned,
        length=group.end - group.start,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def prefill_captures(captured: dict, group: LayerGroup) -> dict[str, Array]:
    """What a group's blocks sowed at prefill (`k`, `v`, maybe `key_scores`),
    from the decoder's "prefill" collection; scanned groups have a leading
    layers axis."""
    sown = captured[group.name]["block"] if group.scanned else captured[group.name]
    return {name: values[0] for name, values in sown.items()}


def fastv_keep_index(layout: SequenceLayout, scores: Float[Array, "B L"], keep: int) -> Int[Array, "B M"]:
    """Rows that stay: all text, and the `keep` visual rows with the highest
    scores, in sequence order (static M = L - visual_length + keep)."""
    batch, length = scores.shape
    start, end = layout.visual_start, layout.visual_end
    _, top = jax.lax.top_k(scores[:, start:end], keep)
    rows = lambda a, b: jnp.broadcast_to(jnp.arange(a, b, dtype=jnp.int32), (batch, b - a))
    return jnp.concatenate([rows(0, start), start + jnp.sort(top, axis=1).astype(jnp.int32), rows(end, length)], axis=1)


class DecoderStack(nn.Module):
    """The layers, in `layer_groups`: plain, Skip-FFN, plain.

    `layout` fixes the visual segments; the text length is read off the input.
    With `fastv` enabled and a `fastv_query` row given (prefill), the visual
    rows are pruned after layer `fastv.layer` (see `fastv_keep_index`).

    Given `caches` (one per layer group) and a KV `policy`, the call is one
    decode step: `h` is one new token per row, and it returns the new `h` and
    caches (flax allows one compact method, so decoding is a mode of it).

    With `scan_layers` each segment is one `nn.scan` (weights, and caches at
    decode, stacked on a leading `layers` axis; compile time independent of
    depth); otherwise the layers are unrolled as `layer_{i}`.
    """

    cfg: DecoderConfig
    layout: SequenceLayout
    skip_layers: range
    partition_kind: str = "positional"
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None  # a jax.checkpoint_policies name: rematerialize each block under it
    scan_layers: bool = False
    fastv: FastVConfig = FastVConfig()

    def groups(self) -> list[LayerGroup]:
        return layer_groups(self.cfg.num_layers, self.skip_layers, self.scan_layers)

    @nn.compact
    def __call__(
        self,
        h: Float[Array, "B L D"],
        positions: Int[Array, "B L"],
        mask: Bool[Array, "B 1 L L"] | None = None,
        scored: ScoredQueries | None = None,
        fastv_query: Int[Array, " B"] | None = None,
        caches: tuple[LayerCache, ...] | None = None,
        policy: KVPolicy | None = None,
        prefixes: tuple[dict[str, Array], ...] | None = None,
    ):
        if caches is not None:
            return self._decode(h, positions, caches, policy)
        if prefixes is not None:
            return self._extend(h, positions, mask, scored, prefixes)
        for group in self.groups():
            layout = self.layout if group.skip else None
            if group.scanned:
                h, _ = scan_group(_ScanStep, group, num_broadcast=3)(
                    self.cfg, layout, self.partition_kind, self.dtype, self.remat, name=group.name
                )(h, positions, mask, scored)
                continue
            block = remat_block(self.remat, scanned=False)(
                self.cfg, layout, self.partition_kind, self.dtype, name=group.name
            )
            prune_after = fastv_query is not None and self.fastv.enabled and group.start == self.fastv.layer - 1
            scores = block.attention_received(h, positions, mask, fastv_query) if prune_after else None
            h = constrain(block(h, positions, mask, scored), HIDDEN_ACTIVATION)
            if prune_after:
                keep = fastv_keep_index(self.layout.for_length(h.shape[1]), scores, self.fastv.keep)
                if self.is_mutable_collection("prefill"):
                    self.sow("prefill", "fastv_index", keep)
                h = jnp.take_along_axis(h, keep[:, :, None], axis=1)
                positions = jnp.take_along_axis(positions, keep, axis=1)
                mask = jnp.take_along_axis(
                    jnp.take_along_axis(mask, keep[:, None, :, None], axis=2), keep[:, None, None, :], axis=3
                )
                scored = None if scored is None else scored.taking(keep)
        return h

    def _extend(self, h, positions, mask, scored, prefixes: tuple[dict[str, Array], ...]):
        """The rows after a shared prefix through every layer, against the
        prefix's captures (one per layer group, scanned groups stacked)."""
        for group, prefix in zip(self.groups(), prefixes, strict=True):
            if group.scanned:
                h, _ = scan_group(_ScanExtendStep, group, num_broadcast=3, num_scanned=1)(
                    self.cfg, self.dtype, name=group.name
                )(h, positions, mask, scored, prefix)
            else:
                block = DecoderBlock(self.cfg, None, dtype=self.dtype, name=group.name)
                h = constrain(block.extend(h, positions, mask, prefix, scored), HIDDEN_ACTIVATION)
        return h

    def _decode(
        self, h: Float[Array, "B 1 D"], positions: Int[Array, "B 1"], caches: tuple[LayerCache, ...], policy: KVPolicy
    ) -> tuple[Float[Array, "B 1 D"], tuple[LayerCache, ...]]:
        """One new token per row through every layer against its cache (the
        blocks run plain: a single token has nothing to skip)."""
        updated = []
        for group, cache in zip(self.groups(), caches, strict=True):
            if group.scanned:
                (h, cache, _), _ = scan_group(_ScanDecodeStep, group, num_broadcast=1)(
                    self.cfg, self.dtype, policy, name=group.name
                )((h, cache, jnp.zeros((), jnp.int32)), positions)
            else:
                h, cache = DecoderBlock(self.cfg, None, dtype=self.dtype, name=group.name).decode(
                    h, positions, cache, policy
                )
            updated.append(cache)
        return h, tuple(updated)
