"""Fixed-budget KV cache and its pruning policies.

Every layer keeps a buffer of `budget` slots. A slot holds the key and value
of one token for the KV heads (never the repeated query heads), the token's
original position (RoPE was applied before caching, so attention stays right
after compaction), a validity flag and a score (accumulated attention, for
the policies that rank by it). Slots are unordered: attention reads the set.

    full         every prompt token, then every new one
    skip_vision  the prompt minus the skipped visual segment (the paper's skip KV cache)
    h2o          heavy hitters by accumulated attention + sinks + a recent window; evicts when full
    snapkv       prompt tokens ranked once at prefill end by the attention of the last
                 `obs_window` prompt queries (pooled); new tokens appended
    streaming    attention sinks + a sliding window; evicts the oldest

All selection is `lax.top_k`/`argmax` over static sizes.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax.sharding import CACHE_KV, constrain

POLICIES = ("full", "skip_vision", "h2o", "snapkv", "streaming")
_PROTECTED = 1e30  # priority of tokens a policy never drops


@dataclasses.dataclass(frozen=True)
class KVPolicy:
    name: str = "full"
    budget: int | None = None  # slots per layer; None: what `full`/`skip_vision` need
    sink_tokens: int = 4
    recent_window: int = 16
    obs_window: int = 8
    pool_kernel: int = 5  # SnapKV's 1-D pooling of the observation scores

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"kv.policy: unknown {self.name!r}, expected one of {POLICIES}")
        for field in ("sink_tokens", "recent_window", "obs_window"):
            if getattr(self, field) < 0:
                raise ValueError(f"kv.{field}: must be >= 0, got {getattr(self, field)}")

    @property
    def evicts(self) -> bool:
        """Whether decoding replaces tokens when the buffer is full."""
        return self.name in ("h2o", "streaming")

    @property
    def prefill_scores(self) -> bool:
        return self.name in ("h2o", "snapkv")

    @property
    def decode_scores(self) -> bool:
        return self.name == "h2o"

    def resolve_budget(self, prompt_len: int, skipped: int, max_new_tokens: int) -> int:
        """The buffer size for a padded prompt of `prompt_len` rows; ValueError if impossible."""
        needed = {"full": prompt_len + max_new_tokens, "skip_vision": prompt_len - skipped + max_new_tokens}.get(
            self.name
        )
        if self.budget is None:
            if needed is None:
                raise ValueError(f"kv.budget: the {self.name} policy needs a budget")
            return needed
        if needed is not None and self.budget < needed:
            raise ValueError(
                f"kv.budget: {self.budget} is smaller than the {needed} slots the {self.name} policy needs for this prompt"
            )
        if self.evicts and self.budget < self.sink_tokens + self.recent_window + 1:
            raise ValueError(
                f"kv.budget: {self.budget} is smaller than sink_tokens + recent_window + 1 ({self.sink_tokens + self.recent_window + 1})"
            )
        if self.name == "snapkv" and self.budget - max_new_tokens < self.obs_window:
            raise ValueError(
                f"kv.budget: {self.budget} leaves fewer than obs_window={self.obs_window} prompt slots after {max_new_tokens} new tokens"
            )
        return self.budget

    def prompt_slots(self, budget: int, prompt_len: int, max_new_tokens: int) -> int:
        """Prompt tokens kept at prefill end; non-evicting policies reserve room for the answer."""
        return min(prompt_len, budget if self.evicts else budget - max_new_tokens)


@flax.struct.dataclass
class LayerCache:
    # Head-major: each (row, KV head) is one contiguous [S, Dh] slab to read.
    k: Float[Array, "B KV S Dh"]
    v: Float[Array, "B KV S Dh"]
    pos: Int[Array, "B S"]  # original position of the token in each slot
    valid: Bool[Array, "B S"]
    score: Float[Array, "B S"]  # accumulated attention received (h2o), else zeros


def constrain_cache(cache: LayerCache) -> LayerCache:
    """Batch over the data axes, KV heads over `tensor` (under sharding.activate)."""
    return LayerCache(
        k=constrain(cache.k, CACHE_KV),
        v=constrain(cache.v, CACHE_KV),
        pos=constrain(cache.pos, ("batch", None)),
        valid=constrain(cache.valid, ("batch", None)),
        score=constrain(cache.score, ("batch", None)),
    )


def _pool(scores: Float[Array, "B L"], kernel: int) -> Float[Array, "B L"]:
    """SnapKV's max-pooling along the keys, so that neighbours of a hit survive too."""
    if kernel <= 1:
        return scores
    return jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, (1, kernel), (1, 1), "SAME")


def prompt_priority(
    policy: KVPolicy,
    positions: Int[Array, "B L"],
    key_valid: Bool[Array, "B L"],
    prompt_lens: Int[Array, " B"],
    skipped: tuple[int, int],
    scores: Float[Array, "B L"] | None,
) -> Float[Array, "B L"]:
    """Higher is kept first; -inf (padding, and the skipped segment under
    `skip_vision`) is never stored as a valid slot."""
    recent = positions >= (prompt_lens[:, None] - policy.recent_window)
    sinks = positions < policy.sink_tokens
    if policy.name == "full":
        priority = jnp.zeros(positions.shape)
    elif policy.name == "skip_vision":
        in_skipped = (positions >= skipped[0]) & (positions < skipped[1])
        priority = jnp.where(in_skipped, -jnp.inf, 0.0)
    elif policy.name == "streaming":
        priority = jnp.where(sinks | recent, _PROTECTED, positions.astype(jnp.float32))
    elif policy.name == "h2o":
        priority = jnp.where(sinks | recent, _PROTECTED, scores)
    else:  # snapkv: the observation window itself is always kept
        observed = positions >= (prompt_lens[:, None] - policy.obs_window)
        priority = jnp.where(observed, _PROTECTED, _pool(jnp.where(key_valid, scores, -jnp.inf), policy.pool_kernel))
    return jnp.where(key_valid, priority, -jnp.inf)


def compact(k, v, positions, key_valid, priority, scores, num_slots: int, budget: int) -> LayerCache:
    """The `num_slots` highest-priority prompt tokens, in a buffer of `budget` slots.

    k, v: [B, L, KV, Dh]; positions, key_valid, priority, scores: [B, L].
    Slots filled from a -inf priority (fewer eligible tokens than slots) are
    free: marked invalid, so decoding writes there first."""
    _, keep = jax.lax.top_k(priority, num_slots)
    keep = jnp.sort(keep, axis=1)
    take = lambda x: jnp.take_along_axis(x, keep, axis=1)  # [B, L] -> [B, S]
    take_heads = lambda x: jnp.take_along_axis(
        x.transpose(0, 2, 1, 3), keep[:, None, :, None], axis=2
    )  # [B, L, KV, Dh] -> [B, KV, S, Dh]
    pad = budget - num_slots
    pad_rows = lambda x, value: jnp.pad(x, [(0, 0), (0, pad)], constant_values=value)
    pad_heads = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)])
    return constrain_cache(
        LayerCache(
            k=pad_heads(take_heads(k)),
            v=pad_heads(take_heads(v)),
            pos=pad_rows(take(positions), -1),
            valid=pad_rows(take(key_valid & (priority > -jnp.inf)), False),
            score=pad_rows(take(scores if scores is not None else jnp.zeros(positions.shape)), 0.0),
        )
    )


def insert_slot(cache: LayerCache, policy: KVPolicy, new_pos: Int[Array, " B"]) -> Int[Array, " B"]:
    """Where each row writes its new token: a free slot if any, else (evicting
    policies) the lowest-ranked token outside the sinks and the recent window."""
    free = ~cache.valid
    if not policy.evicts:
        return jnp.argmax(free, axis=1)
    protected = (cache.pos < policy.sink_tokens) | (cache.pos > new_pos[:, None] - policy.recent_window)
    keep_rank = cache.score if policy.name == "h2o" else cache.pos.astype(jnp.float32)
    evict_rank = jnp.where(free, jnp.inf, jnp.where(protected, -jnp.inf, -keep_rank))
    return jnp.argmax(evict_rank, axis=1)


def insert(
    cache: LayerCache,
    policy: KVPolicy,
    k_new: Float[Array, "B KV Dh"],
    v_new: Float[Array, "B KV Dh"],
    new_pos: Int[Array, " B"],
) -> LayerCache:
    slot = insert_slot(cache, policy, new_pos)
    rows = jnp.arange(slot.shape[0])
    return constrain_cache(
        LayerCache(
            k=cache.k.at[rows, :, slot].set(k_new.astype(cache.k.dtype)),
            v=cache.v.at[rows, :, slot].set(v_new.astype(cache.v.dtype)),
            pos=cache.pos.at[rows, slot].set(new_pos),
            valid=cache.valid.at[rows, slot].set(True),
            score=cache.score.at[rows, slot].set(0.0),
        )
    )


def cache_slots(caches) -> int:
    """Slots per layer (the budget), for per-layer and layer-stacked caches alike."""
    return int(caches[0].pos.shape[-1])


def cache_bytes(caches) -> int:
    return sum(x.size * x.dtype.itemsize for c in caches for x in (c.k, c.v))
