"""Multi-head attention with grouped-query heads and rotary positions.

Keys and values keep their `num_kv_heads` heads; the query heads are grouped
over them inside the attention op, never materialized as repeated K/V.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax.nn.layers import apply_rope, dense, rope_tables
from skipvision_jax.sharding import HEADS_ACTIVATION, KV_ACTIVATION, constrain


def causal_mask(key_valid: Bool[Array, "B L"]) -> Bool[Array, "B 1 L L"]:
    """Query i sees key j iff j <= i and key j is a real token (not padding)."""
    length = key_valid.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None, None] & key_valid[:, None, None, :]


# On CPUs, XLA's attention runs fastest on blocks of about this many query
# rows: the [B, H, rows, S] logits then stay in cache (a 608-token causal
# prefill layer: 23.6 ms whole, 6.2 ms in four blocks; torch's sdpa 5.0 ms).
# None: whole sequences (bench/scale.py sizes accelerators' programs on CPUs).
CPU_QUERY_BLOCK: int | None = 128


def attend(
    q: Float[Array, "B T H Dh"],
    k: Float[Array, "B S KV Dh"],
    v: Float[Array, "B S KV Dh"],
    mask: Bool[Array, "B 1 T S"] | None,
    causal_offset: int | None = None,
) -> Float[Array, "B T H Dh"]:
    """Softmax attention. `causal_offset`: query row r sees no key after
    `causal_offset + r` (a prefill: 0; the rows after a shared prefix of P
    keys: P), so on a CPU each block of query rows reads only the keys up to
    its last row's, and the masked rest is never computed."""
    # jax.nn.dot_product_attention handles GQA natively and dispatches to a fused
    # kernel (cuDNN) where the platform has one; there it takes the whole sequence.
    blocks = [
        jax.nn.dot_product_attention(
            q[:, start:end], k[:, :seen], v[:, :seen], mask=None if mask is None else mask[:, :, start:end, :seen]
        )
        for start, end, seen in query_blocks(q.shape[1], k.shape[1], causal_offset)
    ]
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def query_blocks(rows: int, keys: int, causal_offset: int | None) -> list[tuple[int, int, int]]:
    """(first row, end row, keys it reads) of each block of query rows: one
    block of all off a CPU or where the rows are few (see `CPU_QUERY_BLOCK`)."""
    block = CPU_QUERY_BLOCK
    if block is None or rows <= block or jax.default_backend() != "cpu":
        return [(0, rows, keys)]
    blocks = []
    for start in range(0, rows, block):
        end = min(start + block, rows)
        blocks.append((start, end, keys if causal_offset is None else causal_offset + end))
    return blocks


def attend_cache(
    q: Float[Array, "B T H Dh"],
    k: Float[Array, "B KV S Dh"],
    v: Float[Array, "B KV S Dh"],
    valid: Bool[Array, "B KV S"],
) -> tuple[Float[Array, "B T H Dh"], Float[Array, "B H T S"]]:
    """Attention of a few new queries over a head-major KV cache, and its weights.

    Each (row, KV head) reads one contiguous [S, Dh] slab with its own valid
    slots (the policies select per KV head), which is what makes decoding run
    near memory bandwidth; the weights come for free (the policies that rank
    keys by attention received accumulate them)."""
    b, t, h, dh = q.shape
    kv = k.shape[1]
    grouped = q.reshape(b, t, kv, h // kv, dh).astype(jnp.float32)
    logits = jnp.einsum("btkgd,bksd->bkgts", grouped, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(dh))
    logits = jnp.where(valid[:, :, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, KV, G, T, S]
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, h, dh).astype(v.dtype), probs.reshape(b, h, t, -1)


def attention_probs(
    q: Float[Array, "B T H Dh"], k: Float[Array, "B S KV Dh"], mask: Bool[Array, "B 1 T S"]
) -> Float[Array, "B H T S"]:
    """Softmax attention weights, for the cache policies that score keys by attention received."""
    groups = q.shape[2] // k.shape[2]
    qg = q.reshape(q.shape[:2] + (k.shape[2], groups, q.shape[3]))
    logits = jnp.einsum("btkgd,bskd->bkgts", qg.astype(jnp.float32), k.astype(jnp.float32)) / jnp.sqrt(
        jnp.float32(q.shape[-1])
    )
    logits = logits.reshape(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def received_attention(
    q: Float[Array, "B T H Dh"],
    k: Float[Array, "B S KV Dh"],
    mask: Bool[Array, "B 1 T S"],
    weights: Float[Array, "B T"],
    causal_offset: int | None = None,
) -> Float[Array, "B H S"]:
    """The attention each key receives from the queries, each weighted, per
    query head; on a CPU in blocks of query rows, as `attend` computes them
    (`causal_offset`: see there)."""
    received = jnp.zeros((q.shape[0], q.shape[2], k.shape[1]), jnp.float32)
    for start, end, seen in query_blocks(q.shape[1], k.shape[1], causal_offset):
        probs = attention_probs(q[:, start:end], k[:, :seen], mask[:, :, start:end, :seen])
        received = received.at[:, :, :seen].add(jnp.einsum("bhts,bt->bhs", probs, weights[:, start:end]))
    return received


class Attention(nn.Module):
    width: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None = None  # None: no rotary embedding (the ViT)
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        proj = lambda heads, axis, name: dense(
            (heads, self.head_dim), "embed", (axis, "head_dim"), use_bias=self.use_bias, dtype=self.dtype, name=name
        )
        self.q_proj = proj(self.num_heads, "heads", "q_proj")
        self.k_proj = proj(self.num_kv_heads, "kv_heads", "k_proj")
        self.v_proj = proj(self.num_kv_heads, "kv_heads", "v_proj")
        self.o_proj = dense(
            self.width,
            ("heads", "head_dim"),
            ("embed",),
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="o_proj",
            axis=(-2, -1),
        )

    def project(self, x: Float[Array, "B L D"], positions: Int[Array, "B L"] | None):
        """q [B, L, H, Dh], k and v [B, L, KV, Dh], rotary positions applied to q and k."""
        return self.project_with_states(x, positions)[:3]

    def project_with_states(self, x: Float[Array, "B L D"], positions: Int[Array, "B L"] | None):
        """`project`'s q, k, v and the query states before RoPE (ExpectedAttention's statistics read them)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        states = q
        if self.rope_theta is not None:
            cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, self.rope_llama3_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return constrain(q, HEADS_ACTIVATION), constrain(k, KV_ACTIVATION), constrain(v, KV_ACTIVATION), states

    def __call__(
        self, x: Float[Array, "B L D"], positions: Int[Array, "B L"] | None, mask: Bool[Array, "B 1 L L"] | None
    ) -> Float[Array, "B L D"]:
        q, k, v = self.project(x, positions)
        return self.o_proj(attend(q, k, v, mask))

    def output(self, o: Float[Array, "B L H Dh"]) -> Float[Array, "B L D"]:
        return self.o_proj(o)
