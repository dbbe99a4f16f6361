import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from skipvision_jax.config import ModelConfig
from skipvision_jax.nn.projector import VisualTokens
from skipvision_jax.nn.token_merge import merge_schedule, merge_tokens, tome_merge
from tests.conftest import tiny_config


def test_schedule_reaches_the_target_in_rounds_of_at_most_a_quarter():
    for start, target in [(476, 156), (1024, 256), (16, 8), (3, 1)]:
        rounds = merge_schedule(start, target)
        assert sum(rounds) == start - target
        remaining = start
        for removed in rounds:
            assert 1 <= removed <= max(remaining // 4, 1)
            remaining -= removed
    assert merge_schedule(16, 8) == [4, 3, 1]
    assert merge_schedule(10, 10) == []
    with pytest.raises(ValueError):
        merge_schedule(10, 11)


@pytest.mark.parametrize("num_tokens, target", [(476, 156), (17, 5), (8, 7), (9, 9)])
def test_merge_keeps_static_count_is_deterministic_and_preserves_weighted_mean(num_tokens, target):
    x = jax.random.normal(jax.random.key(num_tokens), (3, num_tokens, 16))
    merge = jax.jit(tome_merge, static_argnums=1)
    merged, size = merge(x, target)
    again, size_again = merge(x, target)
    assert merged.shape == (3, target, 16) and size.shape == (3, target)
    np.testing.assert_array_equal(merged, again)
    np.testing.assert_array_equal(size, size_again)
    np.testing.assert_allclose(size.sum(axis=1), num_tokens)
    weighted_mean = (merged * size[..., None]).sum(axis=1) / size.sum(axis=1)[:, None]
    np.testing.assert_allclose(weighted_mean, x.mean(axis=1), rtol=1e-5, atol=1e-6)


def test_merge_averages_the_most_similar_tokens():
    # Tokens 0 and 1 are near-duplicates; 2 and 3 point elsewhere. Removing one
    # token must merge 0 into 1 (A = even, B = odd).
    x = jnp.array([[[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.2]]])
    merged, size = tome_merge(x, 3)
    np.testing.assert_allclose(merged[0], [[0.0, 1.0], [0.995, 0.05], [-1.0, 0.2]], rtol=1e-6)
    np.testing.assert_array_equal(size[0], [1.0, 2.0, 1.0])


def official_merge_reference(x: np.ndarray, r: int) -> np.ndarray:
    """`RandomBipartiteSoftMatching.forward` of the official Skip-Vision code
    (github zwl666666/Skip-Vision @81b330b, llava/model/llava_arch_index_q_tome.py),
    restated line by line in NumPy (float64)."""
    if r == 0:  # lines 312-313: returned as it came, in image order
        return x
    batch, n, _ = x.shape
    metric = x / np.linalg.norm(x, axis=-1, keepdims=True)  # line 319
    sim = metric @ metric.transpose(0, 2, 1)  # line 320
    diag = np.stack([np.diag(np.diagonal(s)) for s in sim])  # lines 321-322: torch.diag_embed(torch.diagonal(sim))
    sim = (sim - diag).sum(axis=-1)  # line 323
    idx = np.argsort(-sim, axis=-1, kind="stable")[..., None]  # line 324: argsort(descending=True)
    a_idx, b_idx = idx[:, :r], idx[:, r:]  # lines 325-326
    a = np.take_along_axis(metric, a_idx, axis=1)  # line 328
    b = np.take_along_axis(metric, b_idx, axis=1)  # line 329
    scores = a @ b.transpose(0, 2, 1)  # line 330
    dst_idx = scores.argmax(axis=-1)  # line 331: scores.max(dim=-1) indices
    src = np.take_along_axis(x, a_idx, axis=1)  # line 338
    dst = np.take_along_axis(x, b_idx, axis=1)  # line 339
    # line 341: dst.scatter_reduce(-2, dst_idx, src, reduce="mean"); torch's
    # include_self=True default counts the destination itself in the mean.
    total, count = dst.copy(), np.ones(dst.shape[:2])
    for row in range(batch):
        for i in range(r):
            total[row, dst_idx[row, i]] += src[row, i]
            count[row, dst_idx[row, i]] += 1
    return total / count[..., None]


def test_torch_scatter_reduce_mean_includes_the_destination():
    # The reading the reference rests on: [10] + sources 2 and 4 -> (10 + 2 + 4) / 3.
    dst = torch.tensor([[10.0], [1.0]])
    out = dst.scatter_reduce(0, torch.tensor([[0], [0]]), torch.tensor([[2.0], [4.0]]), reduce="mean")
    np.testing.assert_allclose(out[:, 0].numpy(), [16.0 / 3, 1.0], rtol=1e-6)


def separated_inputs(shape: tuple[int, int, int], removed: int, dtype, margin: float = 1e-5) -> jax.Array:
    """Random tokens whose merge does not hinge on a near-tie: adjacent summed
    similarities and each removed token's best and second-best destination
    differ by more than `margin`. Below it float32's accumulation order (XLA's
    against NumPy's) decides, and either answer is the official code's within
    rounding. The first such seed, so the test is deterministic."""
    for seed in range(100):
        x = jax.random.normal(jax.random.key(seed), shape, dtype)
        if removed == 0:
            return x
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        metric = x64 / np.linalg.norm(x64, axis=-1, keepdims=True)
        sim = metric @ metric.transpose(0, 2, 1)
        redundancy = np.sort(sim.sum(axis=-1) - 1.0, axis=-1)
        order = np.argsort(-(sim.sum(axis=-1) - 1.0), axis=-1)[..., None]
        scores = np.take_along_axis(metric, order[:, :removed], 1) @ np.take_along_axis(
            metric, order[:, removed:], 1
        ).transpose(0, 2, 1)
        top2 = np.sort(scores, axis=-1)[..., -2:] if scores.shape[-1] > 1 else np.array([[[0.0, 1.0]]])
        if np.diff(redundancy).min() > margin and (top2[..., 1] - top2[..., 0]).min() > margin:
            return x
    raise AssertionError(f"no seed in 100 gives separated inputs of shape {shape}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens, target", [(476, 156), (17, 5), (8, 7), (6, 6)])
def test_official_merge_equals_the_official_code(num_tokens, target, dtype):
    x = separated_inputs((2, num_tokens, 24), num_tokens - target, dtype)
    merged = jax.jit(merge_tokens, static_argnums=(1, 2))(x, target, "official")
    assert merged.shape == (2, target, 24) and merged.dtype == dtype
    # The reference reads the same (bfloat16-rounded) values in float64.
    expected = official_merge_reference(np.asarray(x.astype(jnp.float32), np.float64), num_tokens - target)
    tolerance = 1e-5
    if dtype == jnp.bfloat16:  # the mean rounded to bfloat16: within one bfloat16 step (a wrong order is off by O(1))
        expected, tolerance = expected.astype(ml_dtypes.bfloat16).astype(np.float64), 2**-7
    np.testing.assert_allclose(np.asarray(merged.astype(jnp.float32)), expected, rtol=tolerance, atol=tolerance)


def test_official_merge_ranks_by_redundancy_and_averages_without_sizes():
    # Three near-copies of one direction (0, 2, 4) and two distinct tokens.
    # Summed similarity ranks the copies first; removing 2 sends copies 0 and 2
    # (ties broken by index) to copy 4, the plain mean of the three; the
    # output follows the ranking: copy 4, then the two distinct ones.
    x = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.1]]])
    merged = merge_tokens(x, 3, "official")
    np.testing.assert_allclose(merged[0, 0], [1.0, 0.1 / 3, 0.1 / 3], rtol=1e-6)
    np.testing.assert_allclose(merged[0, 1:], x[0, jnp.array([1, 3])])


def test_official_merge_carries_gradients_to_the_inputs():
    x = jax.random.normal(jax.random.key(0), (2, 12, 8))
    weights = jax.random.normal(jax.random.key(1), (2, 5, 8))
    loss = lambda x: (merge_tokens(x, 5, "official") * weights).sum()
    check_grads(loss, (x,), order=1, modes=["rev"], eps=1e-3)
    assert float(jnp.abs(jax.grad(loss)(x)).min(axis=-1).min()) > 0  # every input token reaches the output


def test_merge_method_is_checked():
    with pytest.raises(ValueError, match="merge_method"):
        merge_tokens(jnp.ones((1, 4, 2)), 2, "bipartite")


def test_shared_summary_pool_is_one_pool_for_q1_and_q2():
    """layout.summary_pool="shared": the official model's one `ada` pool
    (softmax over Linear(LayerNorm(x)), llama_squeeze_expand576_..._casual_pass_o.py
    lines 1034 and 1126-1127) pools the kept tokens into q1 and the skipped ones into q2."""
    base = tiny_config()
    cfg: ModelConfig = dataclasses.replace(
        base, layout=dataclasses.replace(base.layout, summary_pool="shared", merge_method="official")
    )
    features = jax.random.normal(jax.random.key(0), (2, cfg.vision.num_features, cfg.vision.width))
    module = VisualTokens(cfg)
    params = nn.unbox(module.init(jax.random.key(1), features)["params"])
    # Every weight moved off its initial value, the norm's scale and bias included.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    assert "summary" in params and "summary_kept" not in params and "summary_skipped" not in params
    out = module.apply({"params": params}, features)
    kept_count = cfg.layout.num_kept
    kept, fine = out[:, :kept_count], out[:, kept_count + 1 : -1]

    def pool(x):  # by hand, with the one pool's weights
        ln, score = params["summary"]["norm"]["norm"], params["summary"]["score"]
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
        weights = jax.nn.softmax((normed @ score["kernel"] + score["bias"])[..., 0], axis=-1)
        return np.einsum("bn,bnd->bd", weights, x)

    np.testing.assert_allclose(out[:, kept_count], pool(kept), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, -1], pool(fine), rtol=1e-5, atol=1e-6)
