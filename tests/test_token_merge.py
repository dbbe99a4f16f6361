import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipvision_jax.nn.token_merge import merge_schedule, merge_tokens


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
    merge = jax.jit(merge_tokens, static_argnums=1)
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
    merged, size = merge_tokens(x, 3)
    np.testing.assert_allclose(merged[0], [[0.0, 1.0], [0.995, 0.05], [-1.0, 0.2]], rtol=1e-6)
    np.testing.assert_array_equal(size[0], [1.0, 2.0, 1.0])
