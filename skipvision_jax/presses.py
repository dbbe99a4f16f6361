"""KV presses: one frozen dataclass per press, owning its knobs and its rules.

A press is a press in kvpress's sense (NVIDIA/kvpress, `ScorerPress` in
`kvpress/presses/scorer_press.py`): a score per prompt key and KV head,
higher kept. Where a press reads attention, a KV head's score is the mean over
its query heads (kvpress's GQA convention). Each class also says what differs
between presses beyond the score, so that nothing outside this module asks
which press it holds:

    protect            the prompt keys it always keeps
    queries            the prompt queries whose attention it reads (None: none,
                       and prefill keeps its fused attention)
    fixed_prompt_keys  a set fixed by the layout (full, skip_vision), no budget needed
    least_prompt_room  the fewest prompt slots it can run with
    protected_slots    slots an evicting press never frees (its budget's floor)
    layer_room, kept_under_ratio   per-layer prompt room (PyramidKV shapes it)
    eviction_rank      while decoding, which slot an evicting press frees first
    observe            while decoding, what attention does to the slots' scores

A new press is one class here and a line in `PRESSES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax.partition import in_range

RopeTables = Callable[[Int[Array, "B F"]], tuple[Float[Array, "B F 1 Dh"], Float[Array, "B F 1 Dh"]]]


@dataclasses.dataclass(frozen=True)
class PromptKeys:
    """One layer's prompt as the presses see it at prefill end."""

    k: Float[Array, "B L KV Dh"]  # RoPE applied, as cached
    v: Float[Array, "B L KV Dh"]
    positions: Int[Array, "B L"]
    key_valid: Bool[Array, "B L"]
    prompt_lens: Int[Array, " B"]
    attention: Float[Array, "B H L"] | None  # attention each key received from the press's queries, per query head
    query_states: Float[Array, "B L H Dh"] | None  # before RoPE, where the press asks for them (`reads_query_states`)
    rope: RopeTables  # the model's rotary tables at given positions
    skipped: tuple[int, int]  # [start, end) of the skipped visual segment

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    def per_kv_head(self, x: Float[Array, "B L"]) -> Float[Array, "B KV L"]:
        return jnp.broadcast_to(x[:, None], (x.shape[0], self.num_kv_heads, x.shape[1]))

    def group_mean(self, x: Float[Array, "B H L"]) -> Float[Array, "B KV L"]:
        """Per KV head, the mean over its query heads (kvpress)."""
        b, h, length = x.shape
        return x.reshape(b, self.num_kv_heads, h // self.num_kv_heads, length).mean(axis=2)

    def newest(self, window: int) -> Bool[Array, "B L"]:
        return newest(self.positions, self.prompt_lens, window)


@flax.struct.dataclass
class ScoredQueries:
    """The prompt queries whose attention a press reads, with their weights:
    all L rows of each prompt (`index` None, `weights` [B, L]), or W rows
    (`index` [B, W]), so that a press that reads a few queries (SnapKV's
    window, TOVA's last) costs the prefill W rows of attention, not L."""

    weights: Float[Array, "B W"]
    index: Int[Array, "B W"] | None = None

    @classmethod
    def of(cls, reads: Bool[Array, "B L"], prompt_lens: Int[Array, " B"], window: int | None) -> ScoredQueries:
        """`reads` (a press's `queries`), as the `window` last rows of each
        prompt where the press reads no others."""
        length = reads.shape[1]
        if window is None or window >= length:
            return cls(reads.astype(jnp.float32))
        start = prompt_lens[:, None] - window + jnp.arange(window)  # [B, W]
        index = jnp.clip(start, 0, length - 1)
        # A prompt shorter than the window: the rows before its start count once (clipped copies weigh 0).
        weights = jnp.take_along_axis(reads, index, axis=1) & (start >= 0)
        return cls(weights.astype(jnp.float32), index.astype(jnp.int32))

    def taking(self, keep: Int[Array, "B M"]) -> ScoredQueries:
        """The same queries among the rows FastV keeps (`keep`, sorted): a dropped row weighs nothing."""
        if self.index is None:
            return ScoredQueries(jnp.take_along_axis(self.weights, keep, axis=1))
        at = jnp.clip(jax.vmap(jnp.searchsorted)(keep, self.index), 0, keep.shape[1] - 1)
        kept = jnp.take_along_axis(keep, at, axis=1) == self.index
        return ScoredQueries(jnp.where(kept, self.weights, 0.0), at.astype(jnp.int32))


def newest(positions: Int[Array, "B L"], prompt_lens: Int[Array, " B"], window: int) -> Bool[Array, "B L"]:
    """The last `window` prompt rows of each row."""
    return positions >= prompt_lens[:, None] - window


@dataclasses.dataclass(frozen=True, kw_only=True)
class Press:
    """Defaults are a scorer press that reads no attention, protects nothing,
    and appends while decoding (kvpress compresses at prefill only)."""

    name: ClassVar[str]
    fixed: ClassVar[bool] = False  # keeps a set the layout fixes (`fixed_prompt_keys`): no budget needed
    evicts: ClassVar[bool] = False  # replaces a slot once decoding fills the buffer (budget mode)
    observes: ClassVar[bool] = False  # decoding's attention updates the slots' scores (`observe`)
    reads_query_states: ClassVar[bool] = False  # `score` reads `PromptKeys.query_states`

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"kv.{field.name}: must be >= 0, got {value}")

    @classmethod
    def knobs(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def __str__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if getattr(self, f.name) != f.default
        ]
        return self.name + (f"({', '.join(changed)})" if changed else "")

    def score(self, keys: PromptKeys) -> Float[Array, "B KV L"]:
        raise NotImplementedError

    def protect(self, keys: PromptKeys) -> Bool[Array, "B L"] | None:
        return None

    def queries(
        self, positions: Int[Array, "B L"], key_valid: Bool[Array, "B L"], prompt_lens: Int[Array, " B"]
    ) -> Bool[Array, "B L"] | None:
        return None

    def query_window(self) -> int | None:
        """How many of each prompt's last queries `queries` reads at most; None: any."""
        return None

    def fixed_prompt_keys(self, prompt_len: int, skipped: int) -> int | None:
        return None

    def least_prompt_room(self) -> int:
        return 1

    def protected_slots(self) -> int:
        return 0

    def layer_room(self, layer: int, num_layers: int, prompt_len: int, room: int) -> int:
        """Prompt slots of one layer under a budget leaving `room` per layer."""
        return room

    def kept_under_ratio(self, layer: int, num_layers: int, prompt_len: int, ratio: float) -> int:
        """kvpress.utils.compute_n_kept: int(L * (1 - R)), at least one key."""
        return max(1, int(prompt_len * (1 - ratio)))

    def eviction_rank(
        self, pos: Int[Array, "B KV S"], score: Float[Array, "B KV S"], new_pos: Int[Array, " B"]
    ) -> Float[Array, "B KV S"]:
        """Higher is freed first; -inf is never freed (evicting presses only)."""
        raise NotImplementedError

    def observe(self, score: Float[Array, "B KV S"], probs: Float[Array, "B H T S"]) -> Float[Array, "B KV S"]:
        return score


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullPress(Press):
    """Every prompt token, then every new one."""

    name: ClassVar[str] = "full"
    fixed: ClassVar[bool] = True

    def score(self, keys):
        return jnp.zeros((keys.k.shape[0], keys.num_kv_heads, keys.k.shape[1]))

    def fixed_prompt_keys(self, prompt_len, skipped):
        return prompt_len


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkipVisionPress(FullPress):
    """The prompt minus the skipped visual segment (the paper's skip KV cache)."""

    name: ClassVar[str] = "skip_vision"

    def score(self, keys):
        return keys.per_kv_head(jnp.where(in_range(keys.positions, keys.skipped), -jnp.inf, 0.0))

    def fixed_prompt_keys(self, prompt_len, skipped):
        return prompt_len - skipped


@dataclasses.dataclass(frozen=True, kw_only=True)
class H2OPress(Press):
    """Accumulated attention + sinks + a recent window (H2O paper); evicts the
    least accumulated while decoding."""

    name: ClassVar[str] = "h2o"
    evicts: ClassVar[bool] = True
    observes: ClassVar[bool] = True
    sink_tokens: int = 4
    recent_window: int = 16

    def score(self, keys):
        return keys.group_mean(keys.attention)

    def protect(self, keys):
        return (keys.positions < self.sink_tokens) | keys.newest(self.recent_window)

    def queries(self, positions, key_valid, prompt_lens):
        return key_valid

    def protected_slots(self):
        return self.sink_tokens + self.recent_window

    def eviction_rank(self, pos, score, new_pos):
        protected = (pos < self.sink_tokens) | (pos > new_pos[:, None, None] - self.recent_window)
        return jnp.where(protected, -jnp.inf, -score)

    def observe(self, score, probs):
        b, h, _, s = probs.shape
        kv = score.shape[1]
        return score + probs.sum(axis=2).reshape(b, kv, h // kv, s).mean(axis=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SnapKVPress(Press):
    """SnapKVPress (kvpress/presses/snapkv_press.py): the mean attention of the
    last `obs_window` prompt queries, average-pooled; the window is kept."""

    name: ClassVar[str] = "snapkv"
    obs_window: int = 8
    pool_kernel: int = 5  # odd, as kvpress pads k // 2

    def __post_init__(self):
        super().__post_init__()
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"kv.pool_kernel: must be odd and >= 1, got {self.pool_kernel}")

    def score(self, keys):
        """The window's attention to the keys before it, `avg_pool1d` with zero
        padding (a key near the window's edge averages zeros, not the window's
        own scores), then the mean over each KV head's query heads."""
        before_window = keys.key_valid & ~keys.newest(self.obs_window)
        received = jnp.where(before_window[:, None], keys.group_mean(keys.attention), 0.0)  # pooling and mean commute
        kernel = self.pool_kernel
        return jax.lax.reduce_window(received, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), "SAME") / kernel

    def protect(self, keys):
        return keys.newest(self.obs_window)

    def queries(self, positions, key_valid, prompt_lens):
        return key_valid & newest(positions, prompt_lens, self.obs_window)

    def query_window(self):
        return self.obs_window

    def least_prompt_room(self):
        return self.obs_window


@dataclasses.dataclass(frozen=True, kw_only=True)
class PyramidKVPress(SnapKVPress):
    """PyramidKVPress (kvpress/presses/pyramidkv_press.py): SnapKV's scores, a
    prompt budget per layer falling linearly with depth."""

    name: ClassVar[str] = "pyramidkv"
    pyramid_beta: int = 20  # the pyramid's steepness

    def __post_init__(self):
        super().__post_init__()
        if self.pyramid_beta < 1:
            raise ValueError(f"kv.pyramid_beta: must be >= 1, got {self.pyramid_beta}")

    def layer_keep(self, layer: int, num_layers: int, prompt_len: int, kept_share: float) -> int:
        """PyramidKVPress.get_layer_budget, the same float operations: budgets
        summing to `kept_share` per layer, SnapKV's share where the pyramid
        does not fit."""
        window = self.obs_window
        max_capacity_prompt = window + kept_share
        min_num = (max_capacity_prompt - window) / self.pyramid_beta
        max_num = (max_capacity_prompt - window) * 2 - min_num
        if max_num >= prompt_len - window:
            max_num = prompt_len - window
            min_num = (max_capacity_prompt - window) * 2 - max_num
        if not (prompt_len >= max_num >= min_num >= window):
            return max(1, round(kept_share))
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(max_num - layer * steps)

    def layer_room(self, layer, num_layers, prompt_len, room):
        return self.layer_keep(layer, num_layers, prompt_len, room)

    def kept_under_ratio(self, layer, num_layers, prompt_len, ratio):
        return self.layer_keep(layer, num_layers, prompt_len, prompt_len * (1 - ratio))  # kvpress's expression


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamingPress(Press):
    """StreamingLLMPress: attention sinks + the newest tokens; evicts the oldest."""

    name: ClassVar[str] = "streaming"
    evicts: ClassVar[bool] = True
    sink_tokens: int = 4

    def score(self, keys):
        return keys.per_kv_head(keys.positions.astype(jnp.float32))

    def protect(self, keys):
        return keys.positions < self.sink_tokens

    def protected_slots(self):
        return self.sink_tokens

    def eviction_rank(self, pos, score, new_pos):
        return jnp.where(pos < self.sink_tokens, -jnp.inf, -pos.astype(jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnormPress(Press):
    """KnormPress (kvpress/presses/knorm_press.py): the keys of smallest L2 norm, in float32."""

    name: ClassVar[str] = "knorm"

    def score(self, keys):
        return -jnp.linalg.norm(keys.k.astype(jnp.float32), axis=-1).transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TOVAPress(Press):
    """TOVAPress (kvpress/presses/tova_press.py): the last query's attention
    averaged over all heads, the same for every KV head; evicts the least
    attended while decoding, whatever its place."""

    name: ClassVar[str] = "tova"
    evicts: ClassVar[bool] = True
    observes: ClassVar[bool] = True

    def score(self, keys):
        return keys.per_kv_head(keys.attention.mean(axis=1))

    def protect(self, keys):
        return self.queries(keys.positions, keys.key_valid, keys.prompt_lens)

    def queries(self, positions, key_valid, prompt_lens):
        return positions == prompt_lens[:, None] - 1

    def query_window(self):
        return 1

    def eviction_rank(self, pos, score, new_pos):
        return -score

    def observe(self, score, probs):
        return jnp.broadcast_to(probs.sum(axis=2).mean(axis=1)[:, None], score.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObservedAttentionPress(Press):
    """ObservedAttentionPress (kvpress/presses/observed_attention_press.py):
    the attention a key received summed over the prompt queries, divided by
    how many queries see it (L - position), then the mean over the group."""

    name: ClassVar[str] = "observed_attention"

    def score(self, keys):
        seen_by = jnp.maximum(keys.prompt_lens[:, None] - keys.positions, 1).astype(jnp.float32)
        return keys.group_mean(keys.attention) / seen_by[:, None]

    def queries(self, positions, key_valid, prompt_lens):
        return key_valid


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpectedAttentionPress(Press):
    """ExpectedAttentionPress (kvpress/presses/expected_attention_press.py),
    its defaults: the attention the next `future_positions` queries are
    expected to pay each key, from the prompt queries' mean and covariance
    (before RoPE, the first `sink_tokens` left out), rotated by RoPE averaged
    over those future positions: softmax over the keys of
    k.mu / sqrt(d) + k' cov k / (2 d), the mean over each KV head's query
    heads, times (score + epsilon) * |v|. kvpress pads the sinks with the
    maximum score + 1; here they are protected, which keeps the same keys."""

    name: ClassVar[str] = "expected_attention"
    reads_query_states: ClassVar[bool] = True
    future_positions: int = 512
    sink_tokens: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.future_positions < 1:
            raise ValueError(f"kv.future_positions: must be >= 1, got {self.future_positions}")

    def score(self, keys):
        queries = keys.query_states.astype(jnp.float32)  # [B, L, H, Dh]
        head_dim = queries.shape[-1]
        # The statistics read each row's real queries after the sinks.
        counted = keys.key_valid & (keys.positions >= self.sink_tokens)
        count = jnp.maximum(counted.sum(axis=1), 1).astype(jnp.float32)[:, None, None]  # [B, 1, 1]
        weights = counted[:, :, None, None].astype(jnp.float32)
        mean = (queries * weights).sum(axis=1) / count  # [B, H, Dh]
        future = keys.prompt_lens[:, None] + jnp.arange(self.future_positions)[None]  # [B, F]
        cos, sin = keys.rope(future)  # [B, F, 1, Dh]
        mean_cos, mean_sin = cos.mean(axis=(1, 2)), sin.mean(axis=(1, 2))  # [B, Dh]: RoPE averaged over the future
        half = head_dim // 2
        swap = jnp.zeros((head_dim, head_dim), jnp.float32)  # rotate_half as a matrix
        swap = swap.at[half:, :half].set(jnp.eye(half)).at[:half, half:].set(-jnp.eye(half))
        rotation = mean_cos[:, :, None] * jnp.eye(head_dim) + mean_sin[:, :, None] * swap  # [B, Dh, Dh]
        rotated_mean = jnp.einsum("bij,bhj->bhi", rotation, mean)
        k = keys.k.astype(jnp.float32)  # [B, L, KV, Dh]
        groups = queries.shape[2] // keys.num_kv_heads
        k_heads = jnp.repeat(k, groups, axis=2)  # [B, L, H, Dh], as kvpress's repeat_kv
        logits = jnp.einsum("bhd,blhd->bhl", rotated_mean, k_heads) / jnp.sqrt(jnp.float32(head_dim))
        if self.use_covariance:
            centered = (queries - mean[:, None]) * weights
            cov = jnp.einsum("blhi,blhj->bhij", centered, centered) / count[..., None]  # [B, H, Dh, Dh]
            cov = jnp.einsum("bij,bhjk,blk->bhil", rotation, cov, rotation)
            logits += jnp.einsum("blhi,bhij,blhj->bhl", k_heads, cov, k_heads) / head_dim / 2
        scored = keys.key_valid & (keys.positions >= self.sink_tokens)
        logits = jnp.where(scored[:, None], logits, -jnp.inf)
        probs = jnp.where(scored[:, None], jax.nn.softmax(logits, axis=-1), 0.0)
        score = keys.group_mean(probs)  # [B, KV, L]
        if self.use_vnorm:
            score = (score + self.epsilon) * jnp.linalg.norm(keys.v.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
        return score

    def protect(self, keys):
        return keys.positions < self.sink_tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyDiffPress(Press):
    """KeyDiffPress (kvpress/presses/keydiff_press.py): minus each key's cosine
    similarity to the mean of the row's normalized keys, per KV head (keeps
    the most distinctive keys)."""

    name: ClassVar[str] = "keydiff"

    def score(self, keys):
        k = keys.k.astype(jnp.float32)  # [B, L, KV, Dh]
        unit = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)  # F.normalize
        valid = keys.key_valid[:, :, None, None]
        anchor = (unit * valid).sum(axis=1, keepdims=True) / jnp.maximum(valid.sum(axis=1, keepdims=True), 1)
        # F.cosine_similarity: x.y / max(|x| |y|, eps)
        norms = jnp.linalg.norm(k, axis=-1) * jnp.linalg.norm(anchor, axis=-1)
        cosine = (k * anchor).sum(axis=-1) / jnp.maximum(norms, 1e-8)
        return -cosine.transpose(0, 2, 1)


PRESSES: dict[str, type[Press]] = {
    cls.name: cls
    for cls in (
        FullPress,
        SkipVisionPress,
        H2OPress,
        SnapKVPress,
        PyramidKVPress,
        StreamingPress,
        KnormPress,
        TOVAPress,
        ObservedAttentionPress,
        ExpectedAttentionPress,
        KeyDiffPress,
    )
}
POLICIES = tuple(PRESSES)


def press_class(name: str) -> type[Press]:
    if name not in PRESSES:
        raise ValueError(f"kv.policy: unknown {name!r}, expected one of {POLICIES}")
    return PRESSES[name]


def press_named(name: str, **knobs) -> Press:
    """The press called `name` with these knobs; a one-line ValueError for an
    unknown press or a knob it does not have."""
    cls = press_class(name)
    for knob in knobs:
        if knob not in cls.knobs():
            has = ", ".join(cls.knobs()) or "none"
            raise ValueError(f"kv.{knob}: the {name} press has no such knob (its knobs: {has})")
    return cls(**knobs)


def press_taking(name: str, **knobs) -> Press:
    """The press called `name` with those of `knobs` it has (settings shared
    by several presses run together)."""
    cls = press_class(name)
    return cls(**{knob: value for knob, value in knobs.items() if knob in cls.knobs()})
