"""Fixed-budget KV caches under a KV policy: a press and its budget.

Every layer keeps a buffer of slots for each (row, KV head): the key and
value of one token (never the repeated query heads), the token's original
position (RoPE was applied before caching, so attention stays right after
compaction), a validity flag and a score (for the presses that evict by it).
Slots are unordered: attention reads the set, and each KV head keeps its own.

What a press keeps is its own (`presses.py`); a policy adds how many. Two
budget modes:

    budget=N          a buffer of N slots per layer; the prompt keeps what fits
                      beside the answer, and the evicting presses (h2o,
                      streaming, tova) replace tokens once the buffer is full
    compression=R     kvpress's `compression_ratio`: each row keeps
                      int(L * (1 - R)) of its L prompt keys per KV head,
                      decoding appends

A `CachePlan`, made once from the model config, the policy and the prompt and
answer lengths, holds every static size the caches need. All selection is
`lax.top_k`/`argmax` over static sizes.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax.config import ModelConfig
from skipvision_jax.partition import SequenceLayout
from skipvision_jax.presses import FullPress, Press, PromptKeys, ScoredQueries, press_named, press_taking
from skipvision_jax.sharding import CACHE_KV, CACHE_SLOTS, constrain

_PROTECTED = 1e30  # priority of tokens a press never drops


@dataclasses.dataclass(frozen=True)
class KVPolicy:
    """A press and its budget: `budget` slots per layer, or kvpress's
    compression ratio, or neither for the presses that keep a fixed set."""

    press: Press
    budget: int | None = None
    compression: float | None = None

    @classmethod
    def of(cls, name: str, budget: int | None = None, compression: float | None = None, **knobs) -> KVPolicy:
        """`KVPolicy.of("snapkv", 64, obs_window=4)`: a press by name with its knobs."""
        return cls(press_named(name, **knobs), budget, compression)

    @classmethod
    def taking(cls, name: str, budget: int | None = None, compression: float | None = None, **knobs) -> KVPolicy:
        """Like `of`, the press taking only those of `knobs` it has."""
        return cls(press_taking(name, **knobs), budget, compression)

    def __post_init__(self):
        if not isinstance(self.press, Press):
            raise ValueError(f"kv.policy: expected a press, got {self.press!r}; KVPolicy.of names one")
        if self.compression is not None:
            if self.budget is not None:
                raise ValueError("kv.compression: give a budget or a compression ratio, not both")
            if not 0 <= self.compression < 1:
                raise ValueError(f"kv.compression: must be in [0, 1), got {self.compression}")
            if self.fixed:
                raise ValueError(f"kv.compression: the {self.name} policy keeps a fixed set of keys, not a ratio")

    def __str__(self) -> str:
        if self.compression is not None:
            return f"{self.press}@{self.compression:g}"
        return str(self.press) if self.budget is None else f"{self.press}:{self.budget}"

    @property
    def name(self) -> str:
        return self.press.name

    @property
    def fixed(self) -> bool:
        """The press keeps a set the layout fixes (full, skip_vision): it needs no budget."""
        return self.press.fixed

    @property
    def evicts(self) -> bool:
        """Whether decoding replaces tokens when the buffer is full (kvpress
        compresses at prefill only, so a compression ratio never evicts)."""
        return self.press.evicts and self.compression is None

    @property
    def observes(self) -> bool:
        """Whether decoding updates the slots' scores."""
        return self.evicts and self.press.observes

    def with_knobs_of(self, other: KVPolicy) -> KVPolicy:
        """This policy's press with `other`'s knobs where it has them (a server's
        settings carried over to the press a request names)."""
        shared = {knob: getattr(other.press, knob) for knob in self.press.knobs() if knob in other.press.knobs()}
        return dataclasses.replace(self, press=dataclasses.replace(self.press, **shared))

    def with_default_budget(self, cfg: ModelConfig, num_text: int, max_new_tokens: int) -> KVPolicy:
        """A pruning policy given neither a budget nor a ratio gets half of the
        full cache for prompts of `num_text` padded text tokens, but at least
        what its press needs to run."""
        if self.budget is not None or self.compression is not None or self.fixed:
            return self
        full = CachePlan.make(cfg, KVPolicy(FullPress()), num_text, max_new_tokens).buffer_size
        return dataclasses.replace(self, budget=max(full // 2, self.least_budget(max_new_tokens)))

    def least_budget(self, max_new_tokens: int) -> int:
        """The smallest budget the press runs with."""
        if self.press.evicts:
            return self.press.protected_slots() + 1
        return self.press.least_prompt_room() + max_new_tokens

    def scored_queries(
        self, positions: Int[Array, "B L"], key_valid: Bool[Array, "B L"], prompt_lens: Int[Array, " B"]
    ) -> ScoredQueries | None:
        """Which prompt queries' attention the press reads, or None."""
        reads = self.press.queries(positions, key_valid, prompt_lens)
        return None if reads is None else ScoredQueries.of(reads, prompt_lens, self.press.query_window())

    def resolve_budget(self, prompt_len: int, skipped: int, max_new_tokens: int) -> int:
        """The buffer size for a padded prompt of `prompt_len` rows in budget
        mode; ValueError if impossible."""
        fixed = self.press.fixed_prompt_keys(prompt_len, skipped)
        needed = None if fixed is None else fixed + max_new_tokens
        if self.budget is None:
            if needed is None:
                raise ValueError(f"kv.budget: the {self.name} policy needs a budget or a compression ratio")
            return needed
        if needed is not None and self.budget < needed:
            raise ValueError(
                f"kv.budget: {self.budget} is smaller than the {needed} slots the {self.name} policy needs for this prompt"
            )
        if self.evicts and self.budget < self.least_budget(max_new_tokens):
            raise ValueError(
                f"kv.budget: {self.budget} is smaller than the {self.least_budget(max_new_tokens)} slots the {self.name} policy needs (its protected tokens + 1)"
            )
        prompt_room = self.budget if self.evicts else self.budget - max_new_tokens
        least = self.press.least_prompt_room()
        if prompt_room < least:
            raise ValueError(
                f"kv.budget: {self.budget} leaves {prompt_room} prompt slots after {max_new_tokens} new tokens, fewer than {least}"
            )
        return self.budget


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Every static size of one prompt length's caches under one policy."""

    keep: np.ndarray  # [num_layers, P + 1]: prompt keys kept per KV head, by layer and the row's real prompt length
    slots: tuple[int, ...]  # buffer slots per layer
    layout: SequenceLayout  # the padded prompt's rows

    @classmethod
    def make(cls, cfg: ModelConfig, policy: KVPolicy, num_text: int, max_new_tokens: int) -> CachePlan:
        """The plan for prompts of `num_text` padded text tokens and answers of
        up to `max_new_tokens`; ValueError where the policy cannot take them."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        layout = SequenceLayout.from_config(cfg, num_text)
        prompt_len, num_layers, press = layout.length, cfg.decoder.num_layers, policy.press
        lengths = np.arange(prompt_len + 1)
        if policy.compression is not None:
            keep = np.array(
                [
                    [0] + [press.kept_under_ratio(layer, num_layers, n, policy.compression) for n in lengths[1:]]
                    for layer in range(num_layers)
                ]
            )
            keep = np.minimum(keep, lengths[None])
            return cls(keep, tuple(int(s) + max_new_tokens for s in keep.max(axis=1)), layout)
        budget = policy.resolve_budget(prompt_len, layout.skipped, max_new_tokens)
        answer_room = 0 if policy.evicts else max_new_tokens
        prompt_room = [
            press.layer_room(layer, num_layers, prompt_len, budget - answer_room) for layer in range(num_layers)
        ]
        keep = np.minimum(lengths[None], np.array(prompt_room)[:, None])
        return cls(keep, tuple(room + answer_room for room in prompt_room), layout)

    @property
    def buffer_size(self) -> int:
        """Slots per layer (the largest layer's, where a press sizes layers apart)."""
        return max(self.slots)

    def group(self, start: int, end: int) -> tuple[np.ndarray, int, int]:
        """Layers [start, end) sharing one buffer (a scanned group pads to its
        largest): their keep tables, the top-k size and the buffer size."""
        keep = self.keep[start:end]
        return keep, int(keep.max()), max(self.slots[start:end])


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
    score = policy.press.score(keys)
    priority = score
    protected = policy.press.protect(keys)
    if protected is not None:
        priority = jnp.where(protected[:, None], _PROTECTED, score)
    return jnp.where(keys.key_valid[:, None], priority, -jnp.inf), score


def compact(
    keys: PromptKeys,
    priority: Float[Array, "B KV L"],
    score: Float[Array, "B KV L"],
    keep: Int[Array, " B"],
    num_slots: int,
    buffer_size: int,
) -> LayerCache:
    """Per (row, KV head), the `keep[row]` highest-priority prompt keys (of a
    static `num_slots` ranked), in a buffer of `buffer_size` slots. Slots past
    a row's count or filled from a -inf priority are free: marked invalid, so
    decoding writes there first."""
    num_slots = min(num_slots, priority.shape[-1])  # FastV's later layers cache fewer rows than the prompt has
    _, order = jax.lax.top_k(priority, num_slots)  # [B, KV, S], best first
    chosen = lambda x: jnp.take_along_axis(x, order, axis=2)  # [B, KV, L] -> [B, KV, S]
    heads = lambda x: jnp.take_along_axis(x.transpose(0, 2, 1, 3), order[..., None], axis=2)  # -> [B, KV, S, Dh]
    valid = (chosen(priority) > -jnp.inf) & (jnp.arange(num_slots) < keep[:, None, None])
    pad = buffer_size - num_slots
    pad_slots = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, pad)], constant_values=value)
    pad_heads = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)])
    return constrain_cache(
        LayerCache(
            k=pad_heads(heads(keys.k)),
            v=pad_heads(heads(keys.v)),
            pos=pad_slots(chosen(keys.per_kv_head(keys.positions)), -1),
            valid=pad_slots(valid, False),
            score=pad_slots(jnp.where(valid, chosen(score), 0.0), 0.0),
        )
    )


def insert_slot(cache: LayerCache, policy: KVPolicy, new_pos: Int[Array, " B"]) -> Int[Array, "B KV"]:
    """Where each (row, KV head) writes its new token: a free slot if any,
    else (evicting presses) the one its press frees first."""
    free = ~cache.valid
    if not policy.evicts:
        return jnp.argmax(free, axis=-1)
    rank = policy.press.eviction_rank(cache.pos, cache.score, new_pos)
    return jnp.argmax(jnp.where(free, jnp.inf, rank), axis=-1)


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
    """A decode step's attention into the slots' scores, as the press counts it."""
    return cache.replace(score=policy.press.observe(cache.score, probs))


def cache_slots(caches) -> int:
    """Slots per layer (the largest layer's buffer), for per-layer and layer-stacked caches alike."""
    return max(int(c.pos.shape[-1]) for c in caches)


def cache_bytes(caches) -> int:
    return sum(x.size * x.dtype.itemsize for c in caches for x in (c.k, c.v))
