"""Skip-FFN: equivalences, the hand-computed block, gradients, partitions."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipvision_jax.config import LayoutConfig, SkipConfig
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.nn.attention import causal_mask
from skipvision_jax.nn.decoder import DecoderBlock
from skipvision_jax.partition import (
    SequenceLayout,
    positional_partition,
    topk_partition,
)
from skipvision_jax.train.loss import next_token_loss
from tests.conftest import TINY_DECODER, init_params, logits_of, stack_layers, tiny_batch, tiny_config


def _block_inputs(layout: SequenceLayout, batch=2, seed=1):
    h = jax.random.normal(jax.random.key(seed), (batch, layout.length, TINY_DECODER.width))
    positions = jnp.broadcast_to(jnp.arange(layout.length), (batch, layout.length))
    key_valid = jnp.ones((batch, layout.length), bool).at[1, -1].set(False)
    return h, positions, causal_mask(key_valid)


LAYOUT = SequenceLayout(prefix=2, kept=4, skipped=5, summary_tokens=True, text=6)


def _rms_norm(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _attention_by_hand(params, x, positions, mask, cfg):
    """Reference GQA attention: K/V heads repeated explicitly, rotary by hand."""
    dh = cfg.resolved_head_dim
    q = jnp.einsum("bld,dhk->blhk", x, params["q_proj"]["kernel"])
    k = jnp.einsum("bld,dhk->blhk", x, params["k_proj"]["kernel"])
    v = jnp.einsum("bld,dhk->blhk", x, params["v_proj"]["kernel"])
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dh, 2) / dh)
    angle = positions[..., None] * inv_freq
    cos, sin = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]

    def rotate(t):
        t1, t2 = t[..., : dh // 2], t[..., dh // 2 :]
        return jnp.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)

    q, k = rotate(q), rotate(k)
    groups = cfg.num_heads // cfg.num_kv_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(dh)
    logits = jnp.where(mask, logits, -1e30)
    out = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1), v)
    return jnp.einsum("blhk,hkd->bld", out, params["o_proj"]["kernel"])


def test_skipped_rows_get_attention_only_and_retained_rows_match_the_plain_block():
    cfg = TINY_DECODER
    h, positions, mask = _block_inputs(LAYOUT)
    skip_block = DecoderBlock(cfg, LAYOUT)
    params = nn.unbox(skip_block.init(jax.random.key(0), h, positions, mask))["params"]
    out = skip_block.apply({"params": params}, h, positions, mask)
    plain = DecoderBlock(cfg, None).apply({"params": params}, h, positions, mask)

    attn_only = h + _attention_by_hand(
        params["attn"], _rms_norm(h, params["attn_norm"]["scale"], cfg.norm_eps), positions, mask, cfg
    )
    skipped = slice(LAYOUT.skipped_start, LAYOUT.skipped_end)
    np.testing.assert_allclose(out[:, skipped], attn_only[:, skipped], rtol=1e-5, atol=1e-5)
    retained = np.r_[0 : LAYOUT.skipped_start, LAYOUT.skipped_end : LAYOUT.length]
    np.testing.assert_allclose(out[:, retained], plain[:, retained], rtol=1e-6, atol=1e-6)
    # The FFN really does change the retained rows (the comparison above is not vacuous).
    assert not np.allclose(plain[:, retained], attn_only[:, retained], atol=1e-3)


def test_ffn_weights_get_no_gradient_from_skipped_rows():
    h, positions, mask = _block_inputs(LAYOUT)
    block = DecoderBlock(TINY_DECODER, LAYOUT)
    params = nn.unbox(block.init(jax.random.key(0), h, positions, mask))["params"]

    def grads_for(rows):
        weight = jnp.zeros(h.shape[:2]).at[:, rows].set(1.0)
        loss = lambda p: jnp.sum(block.apply({"params": p}, h, positions, mask) * weight[..., None])
        return jax.grad(loss)(params)

    from_skipped = grads_for(np.arange(LAYOUT.skipped_start, LAYOUT.skipped_end))
    for leaf in jax.tree.leaves(from_skipped["mlp"]) + jax.tree.leaves(from_skipped["mlp_norm"]):
        assert np.all(np.asarray(leaf) == 0.0)
    assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(from_skipped["attn"]))
    from_text = grads_for(np.arange(LAYOUT.visual_end, LAYOUT.length))
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(from_text["mlp"]))


def test_skip_disabled_and_empty_skipped_set_give_identical_logits():
    layout = LayoutConfig(image_offset=2, num_kept=16, merge_to=None, summary_tokens=False)
    cfg_skip = tiny_config(layout=layout, skip=SkipConfig(enabled=True))
    cfg_plain = tiny_config(layout=layout, skip=SkipConfig(enabled=False))
    assert cfg_skip.num_skipped == 0
    batch = tiny_batch(cfg_skip)
    model_skip, params = init_params(cfg_skip)
    model_plain = SkipVisionVLM(cfg_plain)
    np.testing.assert_array_equal(logits_of(model_skip, params, batch), logits_of(model_plain, params, batch))


def test_skip_changes_logits_when_tokens_are_skipped():
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    model, params = init_params(cfg)
    plain = SkipVisionVLM(tiny_config(skip=SkipConfig(enabled=False)))
    assert not np.allclose(logits_of(model, params, batch), logits_of(plain, params, batch), atol=1e-6)


def test_topk_partition_is_static_sorted_and_keeps_text_and_summaries():
    logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.0, 5.0, -2.0, 1.0, 0.5]])  # 4 kept + 5 skipped routable
    part = topk_partition(LAYOUT, logits)
    assert part.retained_idx.shape == (1, LAYOUT.num_retained)
    idx = np.asarray(part.retained_idx[0])
    assert np.all(np.diff(idx) > 0)
    chosen = LAYOUT.routable_positions()[[5, 1, 3, 7]]
    assert set(chosen) | set(LAYOUT.always_retained_positions()) == set(idx)
    gate = dict(zip(idx, np.asarray(part.gate[0])))
    np.testing.assert_allclose(gate[LAYOUT.routable_positions()[5]], jax.nn.sigmoid(5.0), rtol=1e-6)
    assert gate[LAYOUT.q1_index] == 1.0 and gate[LAYOUT.length - 1] == 1.0


def test_topk_block_skips_unselected_rows_and_trains_its_router():
    h, positions, mask = _block_inputs(LAYOUT)
    block = DecoderBlock(TINY_DECODER, LAYOUT, partition_kind="topk")
    params = nn.unbox(block.init(jax.random.key(0), h, positions, mask))["params"]
    out = block.apply({"params": params}, h, positions, mask)
    attn_only = h + _attention_by_hand(
        params["attn"], _rms_norm(h, params["attn_norm"]["scale"], TINY_DECODER.norm_eps), positions, mask, TINY_DECODER
    )
    # The router scores the post-attention rows.
    scores = jnp.einsum("bvd,do->bv", attn_only[:, LAYOUT.routable_positions()], params["router"]["kernel"])
    part = topk_partition(LAYOUT, scores)
    skipped = np.setdiff1d(np.arange(LAYOUT.length), np.asarray(part.retained_idx[0]))
    assert len(skipped) == LAYOUT.skipped
    np.testing.assert_allclose(out[0, skipped], attn_only[0, skipped], rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda p: jnp.sum(block.apply({"params": p}, h, positions, mask) ** 2))(params)
    assert np.abs(grad["router"]["kernel"]).max() > 0


@pytest.mark.parametrize("partition", ["positional", "topk"])
def test_scan_and_remat_match_unrolled_layers(partition):
    cfg = tiny_config(skip=SkipConfig(partition=partition))
    batch = tiny_batch(cfg)
    model, params = init_params(cfg)
    expected = logits_of(model, params, batch)
    scanned = SkipVisionVLM(dataclasses.replace(cfg, scan_layers=True, remat=True))
    stacked = stack_layers(params, [(0, cfg.decoder.num_layers)])
    np.testing.assert_allclose(logits_of(scanned, stacked, batch), expected, rtol=1e-5, atol=1e-5)
    rematted = SkipVisionVLM(dataclasses.replace(cfg, remat=True))
    np.testing.assert_allclose(logits_of(rematted, params, batch), expected, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    model, params = init_params(cfg)
    out16 = logits_of(SkipVisionVLM(dataclasses.replace(cfg, dtype="bfloat16")), params, batch)
    assert out16.dtype == jnp.float32
    out32 = logits_of(model, params, batch)
    # bf16 keeps ~3 significant digits per product: within 10% of the logits' spread
    # (measured: 4.7%, a largest difference of 0.163 on logits up to 3.43)
    np.testing.assert_allclose(out16, out32, atol=0.1 * float(jnp.abs(out32).max()))


def test_loss_counts_answer_tokens_only():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    ids = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    loss_mask = jnp.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], bool)
    loss, count = next_token_loss(logits, ids, loss_mask)
    assert count == 4
    # Logits whose target is not an answer token cannot move the loss.
    changed = logits.at[0, 0].add(10.0).at[1, 3].add(10.0).at[:, 4].add(10.0)
    np.testing.assert_allclose(next_token_loss(changed, ids, loss_mask)[0], loss, rtol=1e-6)
    by_hand = -np.mean([jax.nn.log_softmax(logits[b, t - 1])[ids[b, t]] for b, t in [(0, 3), (0, 4), (1, 2), (1, 3)]])
    np.testing.assert_allclose(loss, by_hand, rtol=1e-5)


def test_positional_partition_is_the_skipped_segment():
    part = positional_partition(LAYOUT)
    h = jnp.arange(LAYOUT.length, dtype=jnp.float32)[None, :, None]
    gathered = part.gather(h)
    assert gathered.shape[1] == LAYOUT.num_retained
    assert not set(np.asarray(gathered[0, :, 0]).astype(int)) & set(range(LAYOUT.skipped_start, LAYOUT.skipped_end))
    np.testing.assert_array_equal(part.scatter(h, gathered), h)


def test_vision_position_table_starts_as_a_2d_sine_cosine_grid():
    """sincos2d: the class token's row is zero and every patch's row is
    distinct; a cell's row and column occupy separate halves of the width."""
    cfg = tiny_config()
    _, params = init_params(cfg)
    table = np.asarray(params["vision"]["pos_embed"])
    grid = cfg.vision.patch_grid
    assert not table[0].any() and len({row.tobytes() for row in table[1:]}) == grid * grid
    cells = table[1:].reshape(grid, grid, -1)
    half = table.shape[1] // 2
    np.testing.assert_array_equal(cells[:, 0, :half], cells[:, 1, :half])  # the first half: the row only
    np.testing.assert_array_equal(cells[0, :, half:], cells[1, :, half:])  # the second: the column only
    _, normal = init_params(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pos_embed_init="normal")))
    assert 0.01 < np.asarray(normal["vision"]["pos_embed"]).std() < 0.03


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_leave_the_gradients_unchanged(policy):
    """Rematerialization trades memory for recomputation, never the result."""
    cfg = tiny_config()
    batch = tiny_batch(cfg)
    model, params = init_params(cfg)
    rematted = SkipVisionVLM(dataclasses.replace(cfg, remat=True, remat_policy=policy))
    grad = lambda m: jax.jit(jax.grad(lambda p: (logits_of(m, p, batch) ** 2).mean()))(params)
    for x, y in zip(jax.tree.leaves(grad(rematted)), jax.tree.leaves(grad(model))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
