"""Attention and the attention keys receive, in query blocks (the CPU
prefill's): each block reads only the keys its rows may see, and the result
is the whole computation's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipvision_jax.nn.attention import CPU_QUERY_BLOCK, attend, attention_probs, causal_mask, received_attention


def _qkv(rows: int, keys: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (2, rows, 4, 8))
    k, v = jax.random.normal(kk, (2, keys, 2, 8)), jax.random.normal(kv, (2, keys, 2, 8))
    return q, k, v


@pytest.mark.parametrize("prefix", [0, 150], ids=["prefill", "after_a_prefix"])
def test_causal_blocks_equal_the_whole_attention(prefix):
    rows = 2 * CPU_QUERY_BLOCK + 44  # three blocks, the last short
    q, k, v = _qkv(rows, prefix + rows)
    key_valid = jnp.ones((2, prefix + rows), bool).at[1, -30:].set(False)  # a right-padded row
    mask = causal_mask(key_valid)[:, :, prefix:]  # [B, 1, rows, prefix + rows]
    whole = jax.nn.dot_product_attention(q, k, v, mask=mask)
    blocked = jax.jit(lambda q, k, v, m: attend(q, k, v, m, causal_offset=prefix))(q, k, v, mask)
    np.testing.assert_allclose(blocked, whole, atol=1e-5)
    # H2O's scores: the attention each key receives from every weighted query row.
    weights = jax.random.uniform(jax.random.key(1), (2, rows))
    received = jnp.einsum("bhts,bt->bhs", attention_probs(q, k, mask), weights)
    ours = jax.jit(lambda q, k, m, w: received_attention(q, k, m, w, causal_offset=prefix))(q, k, mask, weights)
    np.testing.assert_allclose(ours, received, atol=1e-4)


def test_unmasked_blocks_read_every_key():
    q, k, v = _qkv(CPU_QUERY_BLOCK + 20, 64)
    np.testing.assert_allclose(attend(q, k, v, None), jax.nn.dot_product_attention(q, k, v), atol=1e-5)
