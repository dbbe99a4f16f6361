"""Fixed-budget KV cache and its policies, selecting per KV head.

Every layer keeps a buffer of slots for each (row, KV head): the key and
value of one token (never the repeated query heads), the token's original
position (RoPE was applied before caching, so attention stays right after
compaction), a validity flag and a score (for the policies that evict by it).
Slots are unordered: attention reads the set, and each KV head keeps its own.

A policy is a press in kvpress's sense (NVIDIA/kvpress, `ScorerPress` in
`kvpress/presses/scorer_press.py`): a score per prompt key and KV head,
the keys it always keeps, and how many it keeps. Where a policy reads
attention, a KV head's score is the mean over its query heads (kvpress's
GQA convention). Two budget modes:

    budget=N          a buffer of N slots per layer; the prompt keeps what fits
                      beside the answer, and h2o, streaming and tova evict
                      while decoding once the buffer is full
    compression=R     kvpress's `compression_ratio`: each row keeps
                      int(L * (1 - R)) of its L prompt keys per KV head
                      (`compute_n_kept`), decoding appends

    full                every prompt token, then every new one
    skip_vision         the prompt minus the skipped visual segment (the paper's skip KV cache)
    h2o                 accumulated attention + sinks + a recent window (H2O paper); evicts the least accumulated
    snapkv              SnapKVPress: mean attention of the last `obs_window` prompt queries, average-pooled
    pyramidkv           PyramidKVPress: SnapKV's scores, a budget per layer shaped as a pyramid
    streaming           StreamingLLMPress: attention sinks + the newest tokens; evicts the oldest
    knorm               KnormPress: the keys of smallest L2 norm
    tova                TOVAPress: attention of the last query, mean over all heads; evicts the least attended
    observed_attention  ObservedAttentionPress: attention received, averaged over the queries that see the key

All selection is `lax.top_k`/`argmax` over static sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax.partition import in_range
from skipvision_jax.sharding import CACHE_KV, CACHE_SLOTS, constrain

_PROTECTED = 1e30  # priority of tokens a policy never drops


@dataclasses.dataclass(frozen=True)
class PromptKeys:
    """One layer's prompt as the presses see it at prefill end."""

    k: Float[Array, "B L KV Dh"]  # RoPE applied, as cached
    positions: Int[Array, "B L"]
    key_valid: Bool[Array, "B L"]
    prompt_lens: Int[Array, " B"]
    attention: Float[Array, "B H L"] | None  # attention each key received from the press's queries, per query head
    skipped: tuple[int, int]  # [start, end) of the skipped visual segment

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    def per_kv_head(self, x: Float[Array, "B L"]) -> Float[Array, "B KV L"]:
        return jnp.broadcast_to(x[:, None], (x.shape[0], self.num_kv_heads, x.shape[1]))

    def group_mean(self) -> Float[Array, "B KV L"]:
        """Attention received, per KV head: the mean over its query heads (kvpress)."""
        b, h, length = self.attention.shape
        return self.attention.reshape(b, self.num_kv_heads, h // self.num_kv_heads, length).mean(axis=2)


# Which prompt queries' attention a press reads (None: it reads none, and
# prefill keeps its fused attention).
def _all_queries(policy, positions, key_valid, prompt_lens):
    return key_valid


def _window_queries(policy, positions, key_valid, prompt_lens):
    return key_valid & (positions >= prompt_lens[:, None] - policy.obs_window)


def _last_query(policy, positions, key_valid, prompt_lens):
    return positions == prompt_lens[:, None] - 1


def _sinks(policy, keys: PromptKeys):
    return keys.positions < policy.sink_tokens


def _sinks_and_recent(policy, keys: PromptKeys):
    return _sinks(policy, keys) | (keys.positions >= keys.prompt_lens[:, None] - policy.recent_window)


def _window(policy, keys: PromptKeys):
    return keys.positions >= keys.prompt_lens[:, None] - policy.obs_window


def _last(policy, keys: PromptKeys):
    return keys.positions == keys.prompt_lens[:, None] - 1


def _no_score(policy, keys: PromptKeys):
    return jnp.zeros((keys.k.shape[0], keys.num_kv_heads, keys.k.shape[1]))


def _skip_vision_score(policy, keys: PromptKeys):
    return keys.per_kv_head(jnp.where(in_range(keys.positions, keys.skipped), -jnp.inf, 0.0))


def _newest_score(policy, keys: PromptKeys):
    return keys.per_kv_head(keys.positions.astype(jnp.float32))


def _accumulated_score(policy, keys: PromptKeys):
    return keys.group_mean()


def _snapkv_score(policy, keys: PromptKeys):
    """SnapKVPress.score (kvpress/presses/snapkv_press.py): the window's
    attention to the keys before it, `avg_pool1d` with zero padding (so a key
    near the window's edge averages zeros, not the window's own scores), then
    the mean over each KV head's query heads. The window is kept by `_window`."""
    before_window = keys.key_valid & ~_window(policy, keys)
    received = jnp.where(before_window[:, None], keys.group_mean(), 0.0)  # pooling and the mean commute
    kernel = policy.pool_kernel
    pooled = jax.lax.reduce_window(received, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), "SAME") / kernel
    return pooled


def _knorm_score(policy, keys: PromptKeys):
    """KnormPress.score (kvpress/presses/knorm_press.py): minus the key's L2 norm, in float32."""
    return -jnp.linalg.norm(keys.k.astype(jnp.float32), axis=-1).transpose(0, 2, 1)


def _tova_score(policy, keys: PromptKeys):
    """TOVAPress.score (kvpress/presses/tova_press.py): the last query's
    attention averaged over all heads, the same for every KV head."""
    return keys.per_kv_head(keys.attention.mean(axis=1))


def _observed_attention_score(policy, keys: PromptKeys):
    """ObservedAttentionPress.score (kvpress/presses/observed_attention_press.py):
    the attention a key received summed over the prompt queries, divided by
    how many queries see it (L - position), then the mean over the group."""
    seen_by = jnp.maximum(keys.prompt_lens[:, None] - keys.positions, 1).astype(jnp.float32)
    return keys.group_mean() / seen_by[:, None]


@dataclasses.dataclass(frozen=True)
class Press:
    """One policy: `score` (policy, PromptKeys) -> [B, KV, L], higher kept,
    carried into decoding as the slot's score; `protect` (policy, PromptKeys)
    -> [B, L], the keys always kept; `queries` (policy, positions, key_valid,
    prompt_lens) -> [B, L], the prompt queries whose attention it reads;
    `evicts`: it replaces tokens while decoding once the buffer is full."""

    score: Callable
    protect: Callable | None = None
    queries: Callable | None = None
    evicts: bool = False


PRESSES: dict[str, Press] = {
    "full": Press(_no_score),
    "skip_vision": Press(_skip_vision_score),
    "h2o": Press(_accumulated_score, _sinks_and_recent, _all_queries, evicts=True),
    "snapkv": Press(_snapkv_score, _window, _window_queries),
    "pyramidkv": Press(_snapkv_score, _window, _window_queries),
    "streaming": Press(_newest_score, _sinks, evicts=True),
    "knorm": Press(_knorm_score),
    "tova": Press(_tova_score, _last, _last_query, evicts=True),
    "observed_attention": Press(_observed_attention_score, None, _all_queries),
}
POLICIES = tuple(PRESSES)


def compute_n_kept(prompt_len: int, compression: float) -> int:
    """kvpress.utils.compute_n_kept: int(L * (1 - R)), at least one key."""
    return max(1, int(prompt_len * (1 - compression)))


def pyramid_keep(layer: int, num_layers: int, prompt_len: int, kept_share: float, window: int, beta: int) -> int:
    """PyramidKVPress.get_layer_budget (kvpress/presses/pyramidkv_press.py),
    the same float operations: layer budgets falling linearly with depth and
    summing to `kept_share` per layer (`L * (1 - R)`), SnapKV's share where
    the pyramid does not fit."""
    max_capacity_prompt = window + kept_share
    min_num = (max_capacity_prompt - window) / beta
    max_num = (max_capacity_prompt - window) * 2 - min_num
    if max_num >= prompt_len - window:
        max_num = prompt_len - window
        min_num = (max_capacity_prompt - window) * 2 - max_num
    if not (prompt_len >= max_num >= min_num >= window):
        return max(1, round(kept_share))
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(max_num - layer * steps)


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Static sizes of one prompt length's caches."""

    keep: np.ndarray  # [num_layers, P + 1]: prompt keys kept per KV head, by layer and the row's real prompt length
    slots: tuple[int, ...]  # buffer slots per layer

    def group(self, start: int, end: int) -> tuple[np.ndarray, int, int]:
        """Layers [start, end) sharing one buffer (a scanned group pads to its
        largest): their keep tables, the top-k size and the buffer size."""
        keep = self.keep[start:end]
        return keep, int(keep.max()), max(self.slots[start:end])


@dataclasses.dataclass(frozen=True)
class KVPolicy:
    name: str = "full"
    budget: int | None = None  # slots per layer; None: what `full`/`skip_vision` need, or `compression`
    sink_tokens: int = 4
    recent_window: int = 16
    obs_window: int = 8
    pool_kernel: int = 5  # SnapKV's average pooling of the window's scores (odd, as kvpress pads k // 2)
    compression: float | None = None  # kvpress's compression_ratio
    pyramid_beta: int = 20  # PyramidKV's steepness

    def __post_init__(self):
        if self.name not in PRESSES:
            raise ValueError(f"kv.policy: unknown {self.name!r}, expected one of {POLICIES}")
        for field in ("sink_tokens", "recent_window", "obs_window"):
            if getattr(self, field) < 0:
                raise ValueError(f"kv.{field}: must be >= 0, got {getattr(self, field)}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"kv.pool_kernel: must be odd and >= 1, got {self.pool_kernel}")
        if self.pyramid_beta < 1:
            raise ValueError(f"kv.pyramid_beta: must be >= 1, got {self.pyramid_beta}")
        if self.compression is not None:
            if self.budget is not None:
                raise ValueError("kv.compression: give a budget or a compression ratio, not both")
            if not 0 <= self.compression < 1:
                raise ValueError(f"kv.compression: must be in [0, 1), got {self.compression}")
            if self.name in ("full", "skip_vision"):
                raise ValueError(f"kv.compression: the {self.name} policy keeps a fixed set of keys, not a ratio")

    @property
    def press(self) -> Press:
        return PRESSES[self.name]

    @property
    def evicts(self) -> bool:
        """Whether decoding replaces tokens when the buffer is full (kvpress
        compresses at prefill only, so a compression ratio never evicts)."""
        return self.press.evicts and self.compression is None

    @property
    def decode_scores(self) -> bool:
        """Whether decoding updates the slots' scores (the evicting policies that rank by attention)."""
        return self.evicts and self.name in ("h2o", "tova")

    def query_weights(
        self, positions: Int[Array, "B L"], key_valid: Bool[Array, "B L"], prompt_lens: Int[Array, " B"]
    ) -> Float[Array, "B L"] | None:
        """Which prompt queries' attention the press reads, or None."""
        if self.press.queries is None:
            return None
        return self.press.queries(self, positions, key_valid, prompt_lens).astype(jnp.float32)

    def resolve_budget(self, prompt_len: int, skipped: int, max_new_tokens: int) -> int:
        """The buffer size for a padded prompt of `prompt_len` rows in budget
        mode; ValueError if impossible."""
        needed = {"full": prompt_len + max_new_tokens, "skip_vision": prompt_len - skipped + max_new_tokens}.get(
            self.name
        )
        if self.budget is None:
            if needed is None:
                raise ValueError(f"kv.budget: the {self.name} policy needs a budget or a compression ratio")
            return needed
        if needed is not None and self.budget < needed:
            raise ValueError(
                f"kv.budget: {self.budget} is smaller than the {needed} slots the {self.name} policy needs for this prompt"
            )
        protected = {"h2o": self.sink_tokens + self.recent_window, "streaming": self.sink_tokens}.get(self.name, 0)
        if self.evicts and self.budget < protected + 1:
            raise ValueError(
                f"kv.budget: {self.budget} is smaller than the {protected + 1} slots the {self.name} policy needs (its protected tokens + 1)"
            )
        prompt_room = self.budget if self.evicts else self.budget - max_new_tokens
        least = self.obs_window if self.name in ("snapkv", "pyramidkv") else 1
        if prompt_room < least:
            raise ValueError(
                f"kv.budget: {self.budget} leaves {prompt_room} prompt slots after {max_new_tokens} new tokens, fewer than {least}"
            )
        return self.budget

    def plan(self, prompt_len: int, skipped: int, max_new_tokens: int, num_layers: int) -> CachePlan:
        """How many prompt keys each layer keeps, for every real prompt length
        up to the padded `prompt_len`, and each layer's buffer size."""
        lengths = range(prompt_len + 1)
        if self.compression is not None:
            keep = np.array(
                [[self._compressed_keep(n, layer, num_layers) for n in lengths] for layer in range(num_layers)]
            )
            keep = np.minimum(keep, np.arange(prompt_len + 1)[None])
            return CachePlan(keep, tuple(int(s) + max_new_tokens for s in keep.max(axis=1)))
        budget = self.resolve_budget(prompt_len, skipped, max_new_tokens)
        answer_room = 0 if self.evicts else max_new_tokens
        prompt_room = [budget - answer_room] * num_layers
        if self.name == "pyramidkv":
            # The budget is the mean over layers; each layer's prompt share follows the pyramid.
            share = budget - answer_room
            prompt_room = [
                pyramid_keep(layer, num_layers, prompt_len, share, self.obs_window, self.pyramid_beta)
                for layer in range(num_layers)
            ]
        keep = np.minimum(np.arange(prompt_len + 1)[None], np.array(prompt_room)[:, None])
        return CachePlan(keep, tuple(room + answer_room for room in prompt_room))

    def _compressed_keep(self, prompt_len: int, layer: int, num_layers: int) -> int:
        if prompt_len == 0:
            return 0
        if self.name == "pyramidkv":
            share = prompt_len * (1 - self.compression)  # kvpress's expression, for the same float rounding
            return pyramid_keep(layer, num_layers, prompt_len, share, self.obs_window, self.pyramid_beta)
        return compute_n_kept(prompt_len, self.compression)


@flax.struct.dataclass
class LayerCache:
    # Head-major: each (row, KV head) is one contiguous [S, Dh] slab to read,
    # and keeps its own slot set.
    k: Float[Array, "B KV S Dh"]
    v: Float[Array, "B KV S Dh"]
    pos: Int[Array, "B KV S"]  # original position of the token in each slot
    valid: Bool[Array, "B KV S"]
    score: Float[Array, "B KV S"]  # what the evicting policies rank by (accumulated or last attention), else unused


def constrain_cache(cache: LayerCache) -> LayerCache:
    """Batch over the data axes, KV heads over `tensor` (under sharding.activate)."""
    return LayerCache(
        k=constrain(cache.k, CACHE_KV),
        v=constrain(cache.v, CACHE_KV),
        pos=constrain(cache.pos, CACHE_SLOTS),
        valid=constrain(cache.valid, CACHE_SLOTS),
        score=constrain(cache.score, CACHE_SLOTS),
    )


def prompt_scores(policy: KVPolicy, keys: PromptKeys) -> tuple[Float[Array, "B KV L"], Float[Array, "B KV L"]]:
    """(priority, score): higher priority is kept first, protected keys get
    `_PROTECTED`, and -inf (padding, and the skipped segment under
    `skip_vision`) is never stored as a valid slot; the score is what the slot
    carries into decoding."""
    score = policy.press.score(policy, keys)
    priority = score
    if policy.press.protect is not None:
        priority = jnp.where(policy.press.protect(policy, keys)[:, None], _PROTECTED, score)
    return jnp.where(keys.key_valid[:, None], priority, -jnp.inf), score


def compact(
    keys: PromptKeys,
    v: Float[Array, "B L KV Dh"],
    priority: Float[Array, "B KV L"],
    score: Float[Array, "B KV L"],
    keep: Int[Array, " B"],
    num_slots: int,
    budget: int,
) -> LayerCache:
    """Per (row, KV head), the `keep[row]` highest-priority prompt keys (of a
    static `num_slots` ranked), in a buffer of `budget` slots. Slots past a
    row's count or filled from a -inf priority are free: marked invalid, so
    decoding writes there first."""
    num_slots = min(num_slots, priority.shape[-1])  # FastV's later layers cache fewer rows than the prompt has
    _, order = jax.lax.top_k(priority, num_slots)  # [B, KV, S], best first
    chosen = lambda x: jnp.take_along_axis(x, order, axis=2)  # [B, KV, L] -> [B, KV, S]
    heads = lambda x: jnp.take_along_axis(x.transpose(0, 2, 1, 3), order[..., None], axis=2)  # -> [B, KV, S, Dh]
    valid = (chosen(priority) > -jnp.inf) & (jnp.arange(num_slots) < keep[:, None, None])
    pad = budget - num_slots
    pad_slots = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, pad)], constant_values=value)
    pad_heads = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)])
    return constrain_cache(
        LayerCache(
            k=pad_heads(heads(keys.k)),
            v=pad_heads(heads(v)),
            pos=pad_slots(chosen(keys.per_kv_head(keys.positions)), -1),
            valid=pad_slots(valid, False),
            score=pad_slots(jnp.where(valid, chosen(score), 0.0), 0.0),
        )
    )


def insert_slot(cache: LayerCache, policy: KVPolicy, new_pos: Int[Array, " B"]) -> Int[Array, "B KV"]:
    """Where each (row, KV head) writes its new token: a free slot if any,
    else (evicting policies) its lowest-ranked token outside the protected ones."""
    free = ~cache.valid
    if not policy.evicts:
        return jnp.argmax(free, axis=-1)
    if policy.name == "tova":
        protected = jnp.zeros(cache.pos.shape, bool)  # TOVA drops the least attended, whatever its place
    else:
        protected = cache.pos < policy.sink_tokens
        if policy.name == "h2o":
            protected |= cache.pos > new_pos[:, None, None] - policy.recent_window
    keep_rank = cache.pos.astype(jnp.float32) if policy.name == "streaming" else cache.score
    evict_rank = jnp.where(free, jnp.inf, jnp.where(protected, -jnp.inf, -keep_rank))
    return jnp.argmax(evict_rank, axis=-1)


def insert(
    cache: LayerCache,
    policy: KVPolicy,
    k_new: Float[Array, "B KV Dh"],
    v_new: Float[Array, "B KV Dh"],
    new_pos: Int[Array, " B"],
) -> LayerCache:
    slot = insert_slot(cache, policy, new_pos)  # [B, KV]
    rows = jnp.arange(slot.shape[0])[:, None]
    heads = jnp.arange(slot.shape[1])[None, :]
    return constrain_cache(
        LayerCache(
            k=cache.k.at[rows, heads, slot].set(k_new.astype(cache.k.dtype)),
            v=cache.v.at[rows, heads, slot].set(v_new.astype(cache.v.dtype)),
            pos=cache.pos.at[rows, heads, slot].set(jnp.broadcast_to(new_pos[:, None], slot.shape)),
            valid=cache.valid.at[rows, heads, slot].set(True),
            score=cache.score.at[rows, heads, slot].set(0.0),
        )
    )


def observe(cache: LayerCache, policy: KVPolicy, probs: Float[Array, "B H T S"]) -> LayerCache:
    """A decode step's attention into the slots' scores: H2O accumulates the
    mean over each KV head's query heads; TOVA keeps the step's attention,
    averaged over all heads (TOVAPress's convention)."""
    b, h, _, s = probs.shape
    kv = cache.pos.shape[1]
    if policy.name == "h2o":
        received = probs.sum(axis=2).reshape(b, kv, h // kv, s).mean(axis=2)
        return cache.replace(score=cache.score + received)
    received = probs.sum(axis=2).mean(axis=1)
    return cache.replace(score=jnp.broadcast_to(received[:, None], cache.score.shape))


def cache_slots(caches) -> int:
    """Slots per layer (the largest layer's buffer), for per-layer and layer-stacked caches alike."""
    return max(int(c.pos.shape[-1]) for c in caches)


def cache_bytes(caches) -> int:
    return sum(x.size * x.dtype.itemsize for c in caches for x in (c.k, c.v))
