"""The server's engine: a request inserted into a decode row among others, at
any step, decodes as the jitted Generator decodes it alone; compiled once per
bucket."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from skipvision_jax import sharding
from skipvision_jax.batching import prefill_sizes
from skipvision_jax.generate import Generator
from skipvision_jax.inference import INFERENCE_MESH
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.serving.engine import Engine, Prompts
from tests.conftest import init_params, stack_layers, tiny_config

MAX_NEW = 6
BUCKETS = (8, 16)
LENGTHS = (5, 12, 7, 3)  # two buckets; ragged inside each


def _prompt(cfg, length: int, seed: int) -> dict[str, np.ndarray]:
    k_ids, k_px = jax.random.split(jax.random.key(seed))
    size = cfg.vision.image_size
    return {
        "input_ids": np.asarray(jax.random.randint(k_ids, (1, length), 1, cfg.decoder.vocab_size), np.int32),
        "text_mask": np.ones((1, length), bool),
        "pixels": np.asarray(jax.random.normal(k_px, (1, size, size, 3)), np.float32),
    }


def _padded(prompt: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
    pad = bucket - prompt["input_ids"].shape[1]
    return {
        "input_ids": np.pad(prompt["input_ids"], [(0, 0), (0, pad)]),
        "text_mask": np.pad(prompt["text_mask"], [(0, 0), (0, pad)]),
        "pixels": prompt["pixels"],
    }


def _prompts(prompt, bucket, temperature=0.0, seed=0) -> Prompts:
    return Prompts(
        _padded(prompt, bucket),
        np.array([temperature], np.float32),
        np.ones(1, np.float32),
        np.array([seed], np.uint32),
    )


class Driver:
    """An engine and its state, driven as the scheduler drives them."""

    def __init__(self, engine: Engine):
        self.engine, self.state = engine, engine.init_state()

    def insert(self, cfg, prompts: Prompts, rows) -> np.ndarray:
        prefix = self.engine.prefill(cfg, prompts)
        self.state = self.engine.insert(prefix, self.state, np.asarray(rows, np.int32))
        return np.asarray(prefix.last_token)

    def step(self) -> np.ndarray:
        self.state, tokens = self.engine.generate(self.state)
        return tokens


def _run_slots(cfg, params, policy, schedule, num_slots=4):
    """schedule: {step: [(prompt index, slot)]}: inserts before that decode step. Returns, per
    prompt, its tokens and the logits each step computed for its slot (read from the slot state
    just before the step, so the state itself is checked, not only its argmax)."""
    generator = Generator(cfg, policy, MAX_NEW)
    slots = Driver(Engine(generator, num_slots, BUCKETS, (cfg.vision.image_size,) * 2 + (3,), params))
    next_logits = jax.jit(generator.next_logits)
    prompts = [_prompt(cfg, n, seed) for seed, n in enumerate(LENGTHS)]
    owner, out, logits = {}, {i: [] for i in range(len(prompts))}, {i: [] for i in range(len(prompts))}
    for step in range(max(schedule) + MAX_NEW):
        for index, slot in schedule.get(step, []):
            bucket = next(b for b in BUCKETS if b >= LENGTHS[index])
            out[index] = [int(slots.insert(cfg, _prompts(prompts[index], bucket), [slot])[0])]
            owner[slot] = index
        state = slots.state
        step_logits, _ = next_logits(params, state.last_token[:, None], state.next_pos[:, None], state.caches)
        tokens = slots.step()
        for slot, index in owner.items():
            if len(out[index]) < MAX_NEW:
                out[index].append(int(tokens[slot]))
                logits[index].append(np.asarray(step_logits[slot]))
    return prompts, out, logits


CASES = [
    (KVPolicy.of("full"), False),
    (KVPolicy.of("skip_vision"), False),
    (KVPolicy.of("h2o", budget=24, sink_tokens=2, recent_window=4), True),  # evicts while decoding
    (KVPolicy.of("snapkv", compression=0.5, obs_window=3), False),  # per-row counts by prompt length
    (KVPolicy.of("pyramidkv", budget=30, obs_window=3, pyramid_beta=2), True),  # per-layer buffers, padded when scanned
]


@pytest.mark.parametrize("policy, scan", CASES, ids=lambda c: c.name if isinstance(c, KVPolicy) else f"scan={c}")
def test_a_request_decodes_in_a_slot_as_alone(policy, scan):
    cfg = dataclasses.replace(tiny_config(), scan_layers=scan)
    _, params = init_params(tiny_config())
    if scan:
        params = stack_layers(params, [(0, 3)])
    # Inserted at different steps into different slots, beside rows mid-answer; slot 1 reused.
    schedule = {0: [(0, 2)], 2: [(1, 0), (2, 3)], 3: [(3, 1)]}
    prompts, out, logits = _run_slots(cfg, params, policy, schedule)
    generator = Generator(cfg, policy, MAX_NEW, record_logits=True)
    for index, prompt in enumerate(prompts):
        # Alone: a batch of one, padded to its bucket as the server pads it (padding changes
        # nothing: tests/test_eval.py), so two programs serve the four prompts.
        alone = generator(params, _padded(prompt, next(b for b in BUCKETS if b >= LENGTHS[index])))
        assert out[index] == np.asarray(alone.tokens[0]).tolist(), (policy.name, index)
        np.testing.assert_allclose(np.stack(logits[index]), alone.logits[0, 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "policy, scan",
    [
        (KVPolicy.of("h2o", budget=24, sink_tokens=2, recent_window=4), True),
        (KVPolicy.of("snapkv", compression=0.5, obs_window=3), False),
        (KVPolicy.of("expected_attention", compression=0.5, sink_tokens=2), True),
    ],
    ids=lambda c: c.name if isinstance(c, KVPolicy) else f"scan={c}",
)
def test_prompts_that_extend_shared_prefixes_decode_as_alone(policy, scan):
    """What the server runs on a prefix cache hit: two prefixes, computed
    once each (one program), each extended by two ragged prompts in one prefill."""
    cfg = dataclasses.replace(tiny_config(), scan_layers=scan)
    _, params = init_params(tiny_config())
    if scan:
        params = stack_layers(params, [(0, 3)])
    generator = Generator(cfg, policy, MAX_NEW)
    engine = Engine(generator, 4, BUCKETS, (cfg.vision.image_size,) * 2 + (3,), params)
    prompts = [_prompt(cfg, n, seed) for seed, n in enumerate((5, 3, 7, 4))]
    offset = cfg.layout.image_offset
    for prompt, owner in zip(prompts, (0, 0, 2, 2)):  # two questions on each of two images
        prompt["pixels"] = prompts[owner]["pixels"]
        prompt["input_ids"] = np.concatenate([prompts[0]["input_ids"][:, :offset], prompt["input_ids"][:, offset:]], 1)
    padded = [_padded(p, 8) for p in prompts]
    batch = {name: np.concatenate([p[name] for p in padded]) for name in padded[0]}
    made = engine.prefixes(cfg, batch["input_ids"][[0, 2], :offset], batch["pixels"][[0, 2]])
    settings = np.zeros(4, np.float32), np.ones(4, np.float32), np.zeros(4, np.uint32)
    driver = Driver(engine)
    driver.state = engine.insert(
        engine.prefill(cfg, Prompts(batch, *settings), [made[0], made[0], made[1], made[1]]),
        driver.state,
        np.arange(4, dtype=np.int32),
    )
    tokens = np.stack([np.asarray(driver.state.last_token)] + [driver.step() for _ in range(MAX_NEW - 1)], axis=1)
    alone = Generator(cfg, policy, MAX_NEW)
    for row, prompt in enumerate(padded):
        assert tokens[row].tolist() == np.asarray(alone(params, prompt).tokens[0]).tolist(), (policy.name, row)


def test_the_same_seed_draws_the_same_answer_in_any_slot_and_company():
    cfg = tiny_config()
    _, params = init_params(cfg)
    generator = Generator(cfg, KVPolicy.of("full"), MAX_NEW)
    slots = Driver(Engine(generator, 4, BUCKETS, (16, 16, 3), params))
    prompt = _prompt(cfg, 5, 0)

    def sampled(slot, neighbours: int, seed: int) -> list[int]:
        for other in range(neighbours):
            slots.insert(cfg, _prompts(_prompt(cfg, 7, 10 + other), 8, 1.0, 99), [(slot + 1 + other) % 4])
        tokens = [int(slots.insert(cfg, _prompts(prompt, 8, temperature=1.0, seed=seed), [slot])[0])]
        tokens += [int(slots.step()[slot]) for _ in range(MAX_NEW - 1)]
        return tokens

    first = sampled(0, 0, seed=7)
    assert sampled(2, 3, seed=7) == first
    assert any(sampled(0, 0, seed=s) != first for s in (8, 9, 10))  # the seed matters
    greedy = generator(params, _padded(prompt, 8))
    assert first != np.asarray(greedy.tokens[0]).tolist()  # temperature 1 samples


@pytest.mark.parametrize("shared_prefixes", [False, True], ids=["whole", "shared_prefixes"])
def test_warm_compiles_every_program_once(compile_counter, shared_prefixes):
    """On a mesh, as the server runs: the state each program leaves is the
    one every program was compiled for; with shared prefixes, their forward
    per prefill size and the prefill after them too."""
    cfg = tiny_config()
    _, params = init_params(cfg)
    mesh = sharding.make_mesh(INFERENCE_MESH)
    generator = Generator(cfg, KVPolicy.of("h2o", budget=24), MAX_NEW, mesh=mesh, rules=sharding.DEFAULT_RULES)
    engine = Engine(generator, 8, BUCKETS, (16, 16, 3), params)
    assert prefill_sizes(8) == (1, 2, 4, 8) and prefill_sizes(6) == (1, 2, 4, 6)
    sizes = prefill_sizes(2)
    engine.warm(sizes, cfg, shared_prefixes)
    slots = Driver(engine)
    warmed = compile_counter.count
    assert warmed >= (2 if shared_prefixes else 1) * len(BUCKETS) * len(sizes) + 1
    offset = engine.prefix_length(cfg) if shared_prefixes else None
    for bucket in BUCKETS:
        for size in sizes:
            prompts = engine.dummy_prompts(bucket, size)
            if shared_prefixes:
                made = engine.prefixes(cfg, prompts.batch["input_ids"][:, :offset], prompts.batch["pixels"])
                rows = engine.prefill(cfg, prompts, made)
            else:
                rows = engine.prefill(cfg, prompts)
            slots.state = engine.insert(rows, slots.state, np.full(size, 8))
            slots.step()
    assert compile_counter.count == warmed


def test_a_budget_a_bucket_cannot_take_is_refused():
    cfg = tiny_config()
    _, params = init_params(cfg)
    with pytest.raises(ValueError, match="kv.budget"):
        Engine(Generator(cfg, KVPolicy.of("full", budget=30), MAX_NEW), 4, BUCKETS, (16, 16, 3), params)
