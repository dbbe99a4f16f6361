"""KV cache policies, the jitted prefill + decode loop, sampling."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipvision_jax.config import FastVConfig, LayoutConfig, SkipConfig
from skipvision_jax.generate import Generator, Sampling, sample
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.nn.shapes import init_inputs
from tests.conftest import TINY_VISION, init_params, stack_layers, tiny_batch, tiny_config
from tests.kv_reference import ReferenceDecoder

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


@pytest.mark.parametrize(
    "policy",
    [
        KVPolicy.of("full"),
        KVPolicy.of("h2o", budget=40),
        KVPolicy.of("snapkv", budget=40, obs_window=3),
        KVPolicy.of("streaming", budget=40, sink_tokens=2),
    ],
)
def test_unpruned_policies_reproduce_the_cache_free_forward_at_every_step(policy):
    model, params = init_params(CFG)
    prompts = _prompts()
    state = Generator(CFG, policy, MAX_NEW, record_logits=True)(params, prompts)
    expected = _reference_logits(model, params, prompts, np.asarray(state.tokens))
    np.testing.assert_allclose(state.logits, expected, atol=1e-5, rtol=1e-5)


def test_skip_vision_reproduces_the_forward_with_skipped_keys_hidden_from_new_tokens():
    model, params = init_params(CFG)
    prompts = _prompts()
    generator = Generator(CFG, KVPolicy.of("skip_vision"), MAX_NEW, record_logits=True)
    state = generator(params, prompts)
    layout = model.layout(7)
    assert generator.plan(7).buffer_size == layout.length - layout.skipped + MAX_NEW
    expected = _reference_logits(model, params, prompts, np.asarray(state.tokens), skipped_mask_for_new=True)
    np.testing.assert_allclose(state.logits, expected, atol=1e-5, rtol=1e-5)
    # And it is a real change: the full cache gives other logits.
    plain = _reference_logits(model, params, prompts, np.asarray(state.tokens))
    assert not np.allclose(plain[:, 1:], expected[:, 1:], atol=1e-6)


@pytest.mark.parametrize("name", ["h2o", "streaming"])
def test_budget_is_exact_and_sinks_and_recent_window_survive_every_step(name):
    _, params = init_params(CFG)
    policy = KVPolicy.taking(name, budget=12, sink_tokens=2, recent_window=4)
    generator = Generator(CFG, policy, max_new_tokens=8)
    state = generator.prefill(params, _prompts(), jax.random.key(0))
    step = jax.jit(generator._decode_step)
    for _ in range(7):
        state = step(params, state)
        for cache in state.caches:
            assert cache.k.shape[2] == cache.pos.shape[2] == 12
            assert bool(cache.valid.all())
            for row in range(2):
                for head in range(cache.pos.shape[1]):
                    kept = set(np.asarray(cache.pos[row, head]).tolist())
                    newest = int(state.next_pos[row]) - 1
                    assert {0, 1} <= kept, kept
                    assert set(range(newest - 3, newest + 1)) <= kept, (kept, newest)


@pytest.mark.parametrize(
    "policy",
    [
        KVPolicy.of("full"),
        KVPolicy.of("skip_vision"),
        KVPolicy.of("streaming", budget=14, sink_tokens=2),
        KVPolicy.of("h2o", budget=14, sink_tokens=1, recent_window=3),
        KVPolicy.of("snapkv", budget=16, obs_window=3),
        KVPolicy.of("tova", budget=14),
        KVPolicy.of("knorm", budget=16),
        # kvpress's mode: each row keeps int(L (1 - R)) of its own L prompt keys.
        KVPolicy.of("snapkv", compression=0.5, obs_window=3),
        KVPolicy.of("pyramidkv", compression=0.3, obs_window=3, pyramid_beta=2),
        KVPolicy.of("observed_attention", compression=0.6),
        KVPolicy.of("expected_attention", compression=0.5, sink_tokens=2),
        KVPolicy.of("keydiff", budget=16),
    ],
    ids=lambda p: f"{p.name}-{'ratio' if p.compression is not None else 'budget'}",
)
def test_ragged_batch_gives_the_same_tokens_as_each_prompt_alone(policy):
    _, params = init_params(CFG)
    prompts = _prompts()
    generator = Generator(CFG, policy, MAX_NEW)
    batch_state = generator(params, prompts)
    together = np.asarray(batch_state.tokens)
    lens = np.asarray(prompts["text_mask"]).sum(1)
    for row in range(2):
        alone = {
            "input_ids": prompts["input_ids"][row : row + 1, : lens[row]],
            "text_mask": prompts["text_mask"][row : row + 1, : lens[row]],
            "pixels": prompts["pixels"][row : row + 1],
        }
        alone_state = generator(params, alone)
        np.testing.assert_array_equal(np.asarray(alone_state.tokens)[0], together[row])
        # And the caches hold the same keys: each row keeps what its own length asks for.
        for layer in range(CFG.decoder.num_layers):
            for head in range(CFG.decoder.num_kv_heads):
                assert _cached_positions(batch_state, layer, row, head) == _cached_positions(
                    alone_state, layer, 0, head
                )


def test_no_recompilation_across_steps_or_prompts_of_the_same_length(compile_counter):
    _, params = init_params(CFG)
    generator = Generator(CFG, KVPolicy.of("h2o", budget=14, sink_tokens=1, recent_window=3), max_new_tokens=6)
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
    free = np.asarray(Generator(CFG, KVPolicy.of("full"), MAX_NEW)(params, prompts).tokens)
    stop = int(free[0, 1])
    stopped = np.asarray(
        Generator(CFG, KVPolicy.of("full"), MAX_NEW, stop_ids=(stop,), pad_id=0)(params, prompts).tokens
    )
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
        (KVPolicy.of("full", budget=10), "kv.budget"),
        (KVPolicy.of("streaming", budget=2, sink_tokens=2), "kv.budget"),
        (KVPolicy.of("h2o", budget=6, sink_tokens=2, recent_window=4), "kv.budget"),
        (KVPolicy.of("h2o"), "kv.budget"),
        (KVPolicy.of("snapkv", budget=8, obs_window=4), "kv.budget"),
    ],
)
def test_impossible_budgets_are_clear_errors(policy, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Generator(CFG, policy, MAX_NEW).plan(7)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="^kv.policy: unknown 'lru'"):
        KVPolicy.of("lru")


def test_a_knob_the_press_does_not_have_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^kv.sink_tokens: the knorm press has no such knob \(its knobs: none\)"):
        KVPolicy.of("knorm", sink_tokens=9)
    with pytest.raises(ValueError, match="^kv.recent_window: the streaming press has no such knob"):
        KVPolicy.of("streaming", budget=12, recent_window=4)
    assert str(KVPolicy.of("snapkv", 64, obs_window=4)) == "snapkv(obs_window=4):64"
    assert str(KVPolicy.of("pyramidkv", compression=0.5)) == "pyramidkv@0.5"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(name="snapkv", budget=20, compression=0.5), "budget or a compression ratio, not both"),
        (dict(name="snapkv", compression=1.0), r"must be in \[0, 1\), got 1.0"),
        (dict(name="knorm", compression=-0.1), r"must be in \[0, 1\)"),
        (dict(name="full", compression=0.5), "keeps a fixed set"),
    ],
)
def test_bad_compression_ratios_are_clear_errors(fields, message):
    with pytest.raises(ValueError, match=f"^kv.compression: .*{message}"):
        KVPolicy.of(**fields)


# A plain model (no Skip-FFN, every visual token kept), so that the NumPy
# reference is a plain decoder: 2 + 16 + 5 = 23 prompt rows, 21 real in row 1.
PLAIN_CFG = tiny_config(
    layout=LayoutConfig.plain(TINY_VISION.num_features, image_offset=2), skip=SkipConfig(enabled=False)
)


def _cached_positions(state, layer: int, row: int, head: int) -> list[int]:
    cache = state.caches[layer]
    return sorted(np.asarray(cache.pos[row, head])[np.asarray(cache.valid[row, head])].tolist())


@pytest.mark.parametrize(
    "policy",
    [
        KVPolicy.of("h2o", budget=12, sink_tokens=2, recent_window=4),
        KVPolicy.of("streaming", budget=12, sink_tokens=2),
        KVPolicy.of("tova", budget=12),
        KVPolicy.of("snapkv", budget=14, obs_window=3),
    ],
    ids=lambda p: p.name,
)
def test_evicting_policies_keep_the_slots_and_logits_of_a_numpy_reference(policy):
    """At budgets that evict at prefill (and, for h2o, streaming and tova, at
    every decode step): the cached positions of every layer, row and KV head
    after prefill and after each step, and the logits, against
    tests/kv_reference.py."""
    evicted_while_decoding, heads_differ = _check_against_reference(PLAIN_CFG, policy)
    assert evicted_while_decoding == policy.evicts
    # Selection per KV head matters here: some layer's heads keep different keys
    # (TOVA ranks by the mean over all heads, and streaming by position alone).
    assert heads_differ == (policy.name in ("h2o", "snapkv"))


@pytest.mark.parametrize(
    "policy",
    [
        KVPolicy.of("full"),
        KVPolicy.of("h2o", budget=12, sink_tokens=2, recent_window=4),
        # A window longer than a row's text: it reaches into visual rows FastV may drop.
        KVPolicy.of("snapkv", budget=16, obs_window=10),
    ],
    ids=lambda p: p.name,
)
def test_fastv_prunes_the_visual_rows_the_last_prompt_token_attends_least(policy):
    """FastV after layer 1 of 3, 5 of the 16 visual rows kept: layers 1 and 2
    cache only those (and the text), as the NumPy reference decides them."""
    cfg = dataclasses.replace(PLAIN_CFG, fastv=FastVConfig(layer=1, keep=5))
    assert (cfg.layout.image_offset, cfg.visual_length) == (2, 16)
    _check_against_reference(cfg, policy)


def _sharpened(params, std=0.2):
    """Queries and keys rescaled to a larger spread (entries of std 0.2, against
    1/sqrt(48) = 0.14 at initialization): a random model's attention is near
    uniform, so every head would rank keys alike (by how many queries see
    them); sharper attention lets the heads disagree, as a trained model's do."""
    rescale = lambda kernel: kernel * (std / np.std(np.asarray(kernel)))
    decoder = {
        name: {
            **layer,
            "attn": {
                **layer["attn"],
                **{proj: {"kernel": rescale(layer["attn"][proj]["kernel"])} for proj in ("q_proj", "k_proj")},
            },
        }
        for name, layer in params["decoder"].items()
    }
    return {**params, "decoder": decoder}


def _check_against_reference(cfg, policy) -> tuple[bool, bool]:
    """Decodes MAX_NEW tokens for two ragged rows with the jitted caches and
    with the NumPy reference; returns whether the reference evicted while
    decoding, and whether two KV heads of a layer ever held different keys."""
    model, params = init_params(dataclasses.replace(cfg, fastv=FastVConfig()))  # FastV adds no weights
    params = _sharpened(params)
    prompts = {k: v for k, v in tiny_batch(cfg, batch=2, num_text=7).items() if k != "loss_mask"}
    generator = Generator(cfg, policy, MAX_NEW, record_logits=True)
    states = [generator.prefill(params, prompts, jax.random.key(0))]
    step = jax.jit(generator._decode_step)
    for _ in range(MAX_NEW - 1):
        states.append(step(params, states[-1]))
    features = model.apply({"params": params}, prompts["pixels"], method=SkipVisionVLM.encode_images)
    h, key_valid = model.apply(
        {"params": params}, prompts["input_ids"], prompts["text_mask"], features, method=SkipVisionVLM.embed_sequence
    )
    embedding = np.asarray(params["embed"]["embedding"], np.float64)
    evicted_while_decoding = heads_differ = False
    for row in range(2):
        prompt_len = int(key_valid[row].sum())
        reference = ReferenceDecoder(params, cfg, policy, MAX_NEW)
        last, sets = reference.prefill(np.asarray(h[row, :prompt_len], np.float64))
        if policy.budget is not None or cfg.fastv.enabled:
            # the prompt itself was pruned
            assert all(len(s.keys) < prompt_len for layer_sets in sets[cfg.fastv.layer :] for s in layer_sets)
        expected_logits = [reference.logits(last)]
        tokens = np.asarray(states[-1].tokens[row])
        for n, state in enumerate(states):
            if n:
                before = [set(s.keys) for layer_sets in sets for s in layer_sets]
                hidden = reference.step(embedding[tokens[n - 1]], prompt_len + n - 1, sets)
                expected_logits.append(reference.logits(hidden))
                after = [s for layer_sets in sets for s in layer_sets]
                evicted_while_decoding |= any(old - set(s.keys) for old, s in zip(before, after))
            for layer, layer_sets in enumerate(sets):
                for head, layer_set in enumerate(layer_sets):
                    assert _cached_positions(state, layer, row, head) == sorted(layer_set.keys), (row, n, layer, head)
                heads_differ |= any(set(s.keys) != set(layer_sets[0].keys) for s in layer_sets)
        np.testing.assert_allclose(states[-1].logits[row], np.stack(expected_logits), atol=1e-4, rtol=1e-4)
    return evicted_while_decoding, heads_differ


def test_drop_fine_leaves_the_fine_tokens_out_of_the_sequence():
    """The drop-fine baseline: the decoder sequence is [prefix | coarse | text]
    (the coarse rows those of the model that keeps everything), decoded as the
    NumPy reference decodes that sequence."""
    vision = dataclasses.replace(TINY_VISION, pooled_grids=(2,))  # 4 coarse + 16 fine
    plain = dict(vision=vision, skip=SkipConfig(enabled=False))
    dropped = tiny_config(
        layout=LayoutConfig(image_offset=2, num_kept=4, summary_tokens=False, drop_fine=True), **plain
    )
    everything = tiny_config(layout=LayoutConfig(image_offset=2, num_kept=4, summary_tokens=False), **plain)
    assert dropped.num_skipped == 0 and dropped.visual_length == 4
    model, params = init_params(dropped)
    batch = tiny_batch(dropped)
    embed = lambda cfg: SkipVisionVLM(cfg).apply(
        {"params": params},
        batch["input_ids"],
        batch["text_mask"],
        batch["pixels"],
        method=lambda m, i, t, p: m.embed_sequence(i, t, m.encode_images(p)),
    )[0]
    all_rows = np.asarray(embed(everything))
    np.testing.assert_array_equal(embed(dropped), np.concatenate([all_rows[:, :6], all_rows[:, 22:]], axis=1))
    _check_against_reference(dropped, KVPolicy.of("full"))


SCAN_POLICIES = [
    KVPolicy.of("full"),
    KVPolicy.of("skip_vision"),
    KVPolicy.of("h2o", budget=12, sink_tokens=2, recent_window=4),
    KVPolicy.of("snapkv", budget=14, obs_window=3),
    KVPolicy.of("streaming", budget=12, sink_tokens=2),
    KVPolicy.of("tova", budget=12),
    # Per-layer budgets: the scanned Skip-FFN group pads to its larger layer.
    KVPolicy.of("pyramidkv", compression=0.3, obs_window=3, pyramid_beta=2),
]


@pytest.mark.parametrize("policy", SCAN_POLICIES, ids=lambda p: p.name)
def test_scanned_layers_decode_as_the_unrolled_ones(policy):
    # Plain, Skip-FFN and plain layers: three scanned segments, three stacked caches.
    cfg = tiny_config(
        decoder=dataclasses.replace(CFG.decoder, num_layers=4), skip=SkipConfig(layer_start=1, layer_end=3)
    )
    _, params = init_params(cfg)
    prompts = _prompts()
    unrolled = Generator(cfg, policy, MAX_NEW, record_logits=True)(params, prompts)
    stacked = stack_layers(params, [(0, 1), (1, 3), (3, 4)])
    scanned = Generator(dataclasses.replace(cfg, scan_layers=True), policy, MAX_NEW, record_logits=True)(
        stacked, prompts
    )
    np.testing.assert_array_equal(scanned.tokens, unrolled.tokens)
    np.testing.assert_allclose(scanned.logits, unrolled.logits, atol=1e-5, rtol=1e-5)
    assert [c.k.shape[0] for c in scanned.caches] == [1, 2, 1]
    per_layer = [jax.tree.map(lambda x, i=i: x[i], c) for c in scanned.caches for i in range(c.k.shape[0])]
    for ours, theirs in zip(per_layer, unrolled.caches, strict=True):
        # The same tokens survived in every layer and KV head (a padded group holds extra free slots).
        slots = theirs.pos.shape[-1]
        assert not ours.valid[..., slots:].any()
        np.testing.assert_array_equal(
            np.where(ours.valid, ours.pos, -1)[..., :slots], np.where(theirs.valid, theirs.pos, -1)
        )
        np.testing.assert_allclose(ours.k[..., :slots, :], theirs.k, atol=1e-5, rtol=1e-5)


def _decode_program_size(num_layers: int, scan_layers: bool) -> int:
    cfg = tiny_config(decoder=dataclasses.replace(CFG.decoder, num_layers=num_layers), scan_layers=scan_layers)
    model = SkipVisionVLM(cfg)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), **init_inputs(cfg, num_text=7))["params"])
    generator = Generator(cfg, KVPolicy.of("h2o", budget=12, sink_tokens=2, recent_window=4), MAX_NEW)
    state = jax.eval_shape(generator._prefill, params, _prompts(), jax.random.key(0))
    return len(generator._decode_jit.lower(params, state).as_text())


def test_scanned_decode_program_does_not_grow_with_depth():
    scanned = [_decode_program_size(n, scan_layers=True) for n in (2, 8)]
    unrolled = [_decode_program_size(n, scan_layers=False) for n in (2, 8)]
    assert scanned[1] < 1.02 * scanned[0], scanned
    assert unrolled[1] > 2 * unrolled[0], unrolled  # what the scan saves


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_with_text_hidden_from_the_skipped_rows_the_skip_vision_cache_is_exact(scan):
    """model.skip.text_sees_skipped=False (the older official variants): the
    rows after q2 never read the skipped rows, in prefill as in training, so
    dropping their keys after prefill changes nothing: skip_vision's tokens and
    logits are the full cache's at every step. With the default (True, the
    newest official code) the later steps' logits differ, since the text read
    the skipped rows at prefill and cannot after it."""
    cfg = tiny_config(
        decoder=dataclasses.replace(CFG.decoder, num_layers=4), skip=SkipConfig(layer_start=1, layer_end=3)
    )
    _, params = init_params(cfg)
    if scan:
        params = stack_layers(params, [(0, 1), (1, 3), (3, 4)])
    prompts = _prompts()
    runs = {}
    for sees in (False, True):
        masked = dataclasses.replace(cfg, skip=dataclasses.replace(cfg.skip, text_sees_skipped=sees), scan_layers=scan)
        runs[sees] = [
            Generator(masked, KVPolicy.of(name), MAX_NEW, record_logits=True)(params, prompts)
            for name in ("full", "skip_vision")
        ]
    full, skip = runs[False]
    assert skip.caches[0].pos.shape[-1] < full.caches[0].pos.shape[-1]  # the skipped keys really left
    if not scan:  # and both are the cache-free forward of the masked model
        masked = dataclasses.replace(cfg, skip=dataclasses.replace(cfg.skip, text_sees_skipped=False))
        expected = _reference_logits(SkipVisionVLM(masked), params, prompts, np.asarray(skip.tokens))
        np.testing.assert_allclose(skip.logits, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(skip.tokens, full.tokens)
    np.testing.assert_allclose(skip.logits, full.logits, atol=1e-5, rtol=1e-5)
    full, skip = runs[True]
    assert not np.allclose(skip.logits[:, 1:], full.logits[:, 1:], atol=1e-5)
    # Hiding the skipped rows changes the model's own answers: the mask is in prefill.
    assert not np.allclose(runs[False][0].logits[:, 0], runs[True][0].logits[:, 0], atol=1e-5)


def test_text_hidden_from_the_skipped_rows_needs_summary_tokens():
    with pytest.raises(ValueError, match="^skip.text_sees_skipped: False needs summary tokens"):
        tiny_config(
            layout=LayoutConfig(image_offset=2, num_kept=6, merge_to=5, summary_tokens=False),
            skip=SkipConfig(text_sees_skipped=False),
        )
