"""ToMe-style token merging with a static output count.

Bipartite soft matching: the tokens alternate into sets A and B, every A token
finds its most similar B token (cosine), and the r A tokens with the most
similar partners are averaged into them. Rounds remove at most a quarter of
the tokens each: a round that removed half would have to merge every A token,
distinct ones included, while gradual rounds merge the redundant pairs first
(as ToMe's small per-layer r does). The schedule depends on shapes only, so
the output count is static under jit. Each token carries the
number of original tokens it stands for, and merges are size-weighted, which
keeps the token-weighted mean exact.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def merge_schedule(num_tokens: int, target: int) -> list[int]:
    """Tokens removed in each bipartite round to go from `num_tokens` to `target`."""
    if not 0 <= target <= num_tokens:
        raise ValueError(f"merge target {target} is outside [0, {num_tokens}]")
    if target == 0 and num_tokens > 0:
        raise ValueError("merge target must be >= 1 when there are tokens to merge")
    rounds = []
    while num_tokens > target:
        removed = min(num_tokens - target, max(num_tokens // 4, 1))
        rounds.append(removed)
        num_tokens -= removed
    return rounds


def bipartite_merge_round(
    x: Float[Array, "B N D"], size: Float[Array, "B N"], r: int
) -> tuple[Float[Array, "B M D"], Float[Array, "B M"]]:
    """Merges r tokens of set A into their most similar tokens of set B; M = N - r."""
    a, b = x[:, ::2], x[:, 1::2]
    size_a, size_b = size[:, ::2], size[:, 1::2]
    unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-6)
    similarity = jnp.einsum("bid,bjd->bij", unit(a).astype(jnp.float32), unit(b).astype(jnp.float32))  # [B, Na, Nb]
    best_similarity = similarity.max(axis=-1)
    partner = similarity.argmax(axis=-1)  # [B, Na]
    # A stable sort makes ties resolve by index: the result is deterministic.
    order = jnp.argsort(-best_similarity, axis=-1, stable=True)
    merged, unmerged = order[:, :r], jnp.sort(order[:, r:], axis=-1)
    take = lambda t, idx: jnp.take_along_axis(t, idx[..., None] if t.ndim == 3 else idx, axis=1)
    destination = jnp.take_along_axis(partner, merged, axis=1)  # [B, r]
    batch_idx = jnp.arange(x.shape[0])[:, None]
    merged_size = take(size_a, merged)
    b_total = (b * size_b[..., None]).at[batch_idx, destination].add(take(a, merged) * merged_size[..., None])
    new_size_b = size_b.at[batch_idx, destination].add(merged_size)
    out = jnp.concatenate([take(a, unmerged), (b_total / new_size_b[..., None]).astype(x.dtype)], axis=1)
    return out, jnp.concatenate([take(size_a, unmerged), new_size_b], axis=1)


def merge_tokens(x: Float[Array, "B N D"], target: int) -> tuple[Float[Array, "B M D"], Float[Array, "B M"]]:
    """Reduces N tokens to `target` (static). Returns merged tokens and their sizes."""
    size = jnp.ones(x.shape[:2], dtype=jnp.float32)
    for r in merge_schedule(x.shape[1], target):
        x, size = bipartite_merge_round(x, size, r)
    return x, size
