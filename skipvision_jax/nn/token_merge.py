"""Token merging with a static output count: the official Skip-Vision merge and ToMe's.

`merge_tokens(x, target, method)` is the one entry point (`layout.merge_method`):

- "official": `RandomBipartiteSoftMatching` of the official Skip-Vision code
  (github zwl666666/Skip-Vision @81b330b, `llava/model/llava_arch_index_q_tome.py`
  lines 305-342, called after the projector at line 535 with r = 476 - 156). One
  round: every token is ranked by its summed cosine similarity to all the
  others (most redundant first); the r most redundant each go to their most
  similar token among the other N - r; each destination becomes the plain mean
  of itself and what merged into it (`scatter_reduce(..., reduce="mean")`,
  destination included, no size weights); the output is the N - r remaining
  tokens in that ranking's order.
- "tome": ToMe's bipartite soft matching (Bolya et al.), several rounds.
  The tokens alternate into sets A and B, every A token finds its most similar
  B token (cosine), and the r A tokens with the most similar partners are
  averaged into them. Rounds remove at most a quarter of the tokens each: a
  round that removed half would have to merge every A token, distinct ones
  included, while gradual rounds merge the redundant pairs first (as ToMe's
  small per-layer r does). Merges are size-weighted (each token carries the
  number of originals it stands for), which keeps the token-weighted mean
  exact; the output keeps the unmerged A tokens, then B, each in image order.

Both choose partners without gradient (indices only) and carry the gradient
through the averaged values. The schedules depend on shapes only, so the
output count is static under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from skipvision_jax.config import MERGE_METHODS


def _unit(x: Float[Array, "B N D"]) -> Float[Array, "B N D"]:
    """Rows scaled to unit L2 norm, in float32 (the ranking would tie often in
    bfloat16). The official code divides by the norm with no floor; the floor
    only keeps an all-zero token from turning into NaN."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _gather_rows(x: Array, idx: Int[Array, "B K"]) -> Array:
    return jnp.take_along_axis(x, idx[..., None] if x.ndim == 3 else idx, axis=1)


def official_merge(x: Float[Array, "B N D"], target: int) -> Float[Array, "B M D"]:
    """The official Skip-Vision merge (module docstring), N -> M = `target` tokens."""
    num_tokens = x.shape[1]
    removed = num_tokens - target
    if removed == 0:
        return x
    metric = jax.lax.stop_gradient(_unit(x))
    similarity = jnp.einsum("bid,bjd->bij", metric, metric)
    # Summed similarity to every other token: the diagonal (1 each) subtracted,
    # as the official `sim - diag_embed(diagonal(sim))`.
    redundancy = similarity.sum(axis=-1) - jnp.diagonal(similarity, axis1=1, axis2=2)
    ranking = jnp.argsort(-redundancy, axis=-1, stable=True)  # descending; ties by index
    source_idx, kept_idx = ranking[:, :removed], ranking[:, removed:]
    scores = jnp.einsum("brd,bkd->brk", _gather_rows(metric, source_idx), _gather_rows(metric, kept_idx))
    destination = scores.argmax(axis=-1)  # [B, r] into kept_idx; first maximum on ties, as torch.max
    batch_idx = jnp.arange(x.shape[0])[:, None]
    kept = _gather_rows(x, kept_idx).astype(jnp.float32)
    totals = kept.at[batch_idx, destination].add(_gather_rows(x, source_idx).astype(jnp.float32))
    counts = jnp.ones(kept.shape[:2], jnp.float32).at[batch_idx, destination].add(1.0)
    return (totals / counts[..., None]).astype(x.dtype)


def merge_schedule(num_tokens: int, target: int) -> list[int]:
    """Tokens removed in each ToMe round to go from `num_tokens` to `target`."""
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
    """One ToMe round: r tokens of set A merge into their most similar tokens of set B; M = N - r."""
    a, b = x[:, ::2], x[:, 1::2]
    size_a, size_b = size[:, ::2], size[:, 1::2]
    similarity = jnp.einsum("bid,bjd->bij", _unit(a), _unit(b))  # [B, Na, Nb]
    best_similarity = similarity.max(axis=-1)
    partner = similarity.argmax(axis=-1)  # [B, Na]
    # A stable sort makes ties resolve by index: the result is deterministic.
    order = jnp.argsort(-best_similarity, axis=-1, stable=True)
    merged, unmerged = order[:, :r], jnp.sort(order[:, r:], axis=-1)
    destination = jnp.take_along_axis(partner, merged, axis=1)  # [B, r]
    batch_idx = jnp.arange(x.shape[0])[:, None]
    merged_size = _gather_rows(size_a, merged)
    b_total = (b * size_b[..., None]).at[batch_idx, destination].add(_gather_rows(a, merged) * merged_size[..., None])
    new_size_b = size_b.at[batch_idx, destination].add(merged_size)
    out = jnp.concatenate([_gather_rows(a, unmerged), (b_total / new_size_b[..., None]).astype(x.dtype)], axis=1)
    return out, jnp.concatenate([_gather_rows(size_a, unmerged), new_size_b], axis=1)


def tome_merge(x: Float[Array, "B N D"], target: int) -> tuple[Float[Array, "B M D"], Float[Array, "B M"]]:
    """ToMe rounds down to `target` tokens. Returns the tokens and their sizes."""
    size = jnp.ones(x.shape[:2], dtype=jnp.float32)
    for r in merge_schedule(x.shape[1], target):
        x, size = bipartite_merge_round(x, size, r)
    return x, size


def merge_tokens(x: Float[Array, "B N D"], target: int, method: str = "official") -> Float[Array, "B M D"]:
    """N tokens -> `target` (static) by `method` ("official" or "tome", module docstring)."""
    if method == "official":
        if not 1 <= target <= x.shape[1]:
            raise ValueError(f"merge target {target} is outside [1, {x.shape[1]}]")
        return official_merge(x, target)
    if method == "tome":
        return tome_merge(x, target)[0]
    raise ValueError(f"layout.merge_method: unknown {method!r}, expected one of {MERGE_METHODS}")


def merge_weights(x: Float[Array, "B N D"], target: int, method: str = "official") -> Float[Array, "B M N"]:
    """The averaging matrix `merge_tokens` applies to `x`: output token m is
    sum_n W[m, n] x[n], W's row m the weights of the group merged into m. The
    partners are chosen from `x` without gradient, so W is the merge's
    derivative in `x`, read off one linearized pass per block of D inputs
    (input n's tangent is the unit vector n, placed in its block). For the
    pictures of what the model keeps (skipvision_jax/visualize.py)."""
    batch, num_tokens, width = x.shape
    _, linear = jax.linearize(lambda v: merge_tokens(v, target, method), x.astype(jnp.float32))
    blocks = []
    for start in range(0, num_tokens, width):
        size = min(width, num_tokens - start)
        tangent = jnp.zeros((batch, num_tokens, width), jnp.float32)
        tangent = tangent.at[:, start : start + size, :size].set(jnp.eye(size))
        blocks.append(linear(tangent)[..., :size])  # [B, M, size]
    return jnp.concatenate(blocks, axis=-1)
