"""KV cache policies, the jitted prefill + decode loop, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipvision_jax.generate import Generator, Sampling, sample
from skipvision_jax.kvcache import KVPolicy
from tests.conftest import init_params, tiny_batch, tiny_config

MAX_NEW = 5
CFG = tiny_config()


def _prompts(seed=0):
    batch = tiny_batch(CFG, batch=2, num_text=7, seed=seed)  # row 1 has 2 padded text tokens
    return {k: v for k, v in batch.items() if k != "loss_mask"}


def _reference_logits(model, params, prompts, tokens, skipped_mask_for_new=False):
    """Cache-free forward over prompt + generated tokens; logits that predicted each generated token."""
    ids, mask = np.asarray(prompts["input_ids"]), np.asarray(prompts["text_mask"])
    b, t = ids.shape
    lens = mask.sum(1)
    full_ids = np.zeros((b, t + MAX_NEW), np.int32)
    full_mask = np.zeros((b, t + MAX_NEW), bool)
    for row in range(b):
        full_ids[row, : lens[row]] = ids[row, : lens[row]]
        full_ids[row, lens[row] : lens[row] + MAX_NEW - 1] = tokens[row, : MAX_NEW - 1]
        full_mask[row, : lens[row] + MAX_NEW - 1] = True
    layout = model.layout(t + MAX_NEW)
    extra = None
    if skipped_mask_for_new:
        # Queries of generated tokens must not see the skipped visual keys.
        text_pos = layout.text_positions()
        extra = np.ones((b, layout.length, layout.length), bool)
        for row in range(b):
            new_rows = text_pos[lens[row] : lens[row] + MAX_NEW - 1]
            extra[row, new_rows[:, None], np.arange(layout.skipped_start, layout.skipped_end)[None]] = False
    logits = jax.jit(model.apply)({"params": params}, full_ids, full_mask, prompts["pixels"], None, extra)
    return np.stack([logits[row, lens[row] - 1 : lens[row] - 1 + MAX_NEW] for row in range(b)])


@pytest.mark.parametrize("policy", [KVPolicy("full"), KVPolicy("h2o", budget=40), KVPolicy("snapkv", budget=40, obs_window=3), KVPolicy("streaming", budget=40, sink_tokens=2, recent_window=4)])
def test_unpruned_policies_reproduce_the_cache_free_forward_at_every_step(policy):
    model, params = init_params(CFG)
    prompts = _prompts()
    state = Generator(CFG, policy, MAX_NEW, record_logits=True)(params, prompts)
    expected = _reference_logits(model, params, prompts, np.asarray(state.tokens))
    np.testing.assert_allclose(state.logits, expected, atol=1e-5, rtol=1e-5)


def test_skip_vision_reproduces_the_forward_with_skipped_keys_hidden_from_new_tokens():
    model, params = init_params(CFG)
    prompts = _prompts()
    generator = Generator(CFG, KVPolicy("skip_vision"), MAX_NEW, record_logits=True)
    state = generator(params, prompts)
    layout = model.layout(7)
    assert generator.budget(7) == layout.length - layout.skipped + MAX_NEW
    expected = _reference_logits(model, params, prompts, np.asarray(state.tokens), skipped_mask_for_new=True)
    np.testing.assert_allclose(state.logits, expected, atol=1e-5, rtol=1e-5)
    # And it is a real change: the full cache gives other logits.
    plain = _reference_logits(model, params, prompts, np.asarray(state.tokens))
    assert not np.allclose(plain[:, 1:], expected[:, 1:], atol=1e-6)


@pytest.mark.parametrize("name", ["h2o", "streaming"])
def test_budget_is_exact_and_sinks_and_recent_window_survive_every_step(name):
    _, params = init_params(CFG)
    policy = KVPolicy(name, budget=12, sink_tokens=2, recent_window=4)
    generator = Generator(CFG, policy, max_new_tokens=8)
    state = generator.prefill(params, _prompts(), jax.random.key(0))
    step = jax.jit(generator._decode_step)
    for _ in range(7):
        state = step(params, state)
        for cache in state.caches:
            assert cache.k.shape[2] == cache.pos.shape[1] == 12
            assert bool(cache.valid.all())
            for row in range(2):
                kept = set(np.asarray(cache.pos[row]).tolist())
                newest = int(state.next_pos[row]) - 1
                assert {0, 1} <= kept, kept
                assert set(range(newest - 3, newest + 1)) <= kept, (kept, newest)


@pytest.mark.parametrize("policy", [KVPolicy("full"), KVPolicy("skip_vision"), KVPolicy("streaming", budget=14, sink_tokens=2, recent_window=4), KVPolicy("h2o", budget=14, sink_tokens=1, recent_window=3), KVPolicy("snapkv", budget=16, obs_window=3)])
def test_ragged_batch_gives_the_same_tokens_as_each_prompt_alone(policy):
    _, params = init_params(CFG)
    prompts = _prompts()
    generator = Generator(CFG, policy, MAX_NEW)
    together = np.asarray(generator(params, prompts).tokens)
    lens = np.asarray(prompts["text_mask"]).sum(1)
    for row in range(2):
        alone = {"input_ids": prompts["input_ids"][row : row + 1, : lens[row]], "text_mask": prompts["text_mask"][row : row + 1, : lens[row]], "pixels": prompts["pixels"][row : row + 1]}
        np.testing.assert_array_equal(np.asarray(generator(params, alone).tokens)[0], together[row])


def test_no_recompilation_across_steps_or_prompts_of_the_same_length(compile_counter):
    _, params = init_params(CFG)
    generator = Generator(CFG, KVPolicy("h2o", budget=14, sink_tokens=1, recent_window=3), max_new_tokens=6)
    first, second = _prompts(seed=1), _prompts(seed=2)
    jax.block_until_ready(generator(params, first).tokens)
    before = compile_counter.count
    out = generator(params, second)
    jax.block_until_ready(out.tokens)
    assert compile_counter.count == before
    assert int(out.step) == 6  # the loop really ran every step


def test_stop_tokens_end_rows_and_pad_the_rest():
    _, params = init_params(CFG)
    prompts = _prompts()
    free = np.asarray(Generator(CFG, KVPolicy("full"), MAX_NEW)(params, prompts).tokens)
    stop = int(free[0, 1])
    stopped = np.asarray(Generator(CFG, KVPolicy("full"), MAX_NEW, stop_ids=(stop,), pad_id=0)(params, prompts).tokens)
    first_stop = list(free[0]).index(stop)
    np.testing.assert_array_equal(stopped[0, : first_stop + 1], free[0, : first_stop + 1])
    assert (stopped[0, first_stop + 1 :] == 0).all()


def test_sampling_modes():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert int(sample(logits, jax.random.key(0), Sampling())[0]) == 0
    draws = jnp.stack([sample(logits, jax.random.key(i), Sampling(greedy=False, top_k=2)) for i in range(200)])
    assert set(np.asarray(draws).ravel().tolist()) == {0, 1}
    draws = jnp.stack([sample(logits, jax.random.key(i), Sampling(greedy=False, top_p=0.7)) for i in range(200)])
    assert set(np.asarray(draws).ravel().tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    assert int(sample(logits, jax.random.key(0), Sampling(greedy=False, temperature=1e-4))[0]) == 0


@pytest.mark.parametrize(
    "policy, field",
    [
        (KVPolicy("full", budget=10), "kv.budget"),
        (KVPolicy("streaming", budget=5, sink_tokens=2, recent_window=4), "kv.budget"),
        (KVPolicy("h2o"), "kv.budget"),
        (KVPolicy("snapkv", budget=8, obs_window=4), "kv.budget"),
    ],
)
def test_impossible_budgets_are_clear_errors(policy, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Generator(CFG, policy, MAX_NEW).budget(7)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="^kv.policy: unknown 'lru'"):
        KVPolicy("lru")
