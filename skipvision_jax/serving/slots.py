"""Decode slots for continuous batching: JetStream's prefill / insert /
generate split over the fixed-budget caches.

A `SlotBatch` holds `num_slots` decode rows under one KV policy. Requests are
prefilled a few at a time in eval.py's length buckets and their caches written
into free rows (`insert`, one jitted program per bucket and prefill size);
`step` advances every row by one token (one jitted program). Rows are
independent: a row's answer is the same whatever the other rows hold, so a
request decodes as it would alone. Every row's cache buffer is sized for the
longest bucket, so prompts of every length share one decode program; the
slots this adds are free (invalid) slots, which change nothing for policies
that append, and the policies that evict keep their budget-sized buffer.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.generate import Generator, sample_rows
from skipvision_jax.kvcache import LayerCache, constrain_cache
from skipvision_jax.nn.decoder import LayerGroup


@flax.struct.dataclass
class SlotState:
    caches: tuple[LayerCache, ...]  # one per layer group; rows are slots (scanned groups: after the layers axis)
    last_token: Int[Array, " S"]  # the token each slot feeds next
    next_pos: Int[Array, " S"]  # its position
    keys: jax.Array  # [S] PRNG keys: a request's draws depend on its own seed only
    temperature: Float[Array, " S"]  # 0: greedy
    top_p: Float[Array, " S"]


@flax.struct.dataclass
class Prompts:
    """Up to a prefill size of prompts of one layout and bucket, as numpy
    arrays padded to that size (padding rows repeat the first prompt and go to
    slot `num_slots`, out of range: their writes are dropped)."""

    batch: dict[str, np.ndarray]  # input_ids, text_mask [P, bucket]; pixels [P, H, W, C]
    slots: np.ndarray  # [P] int32
    temperature: np.ndarray  # [P] float32
    top_p: np.ndarray  # [P] float32
    seeds: np.ndarray  # [P] uint32: each request's PRNG seed


def _write_rows(old: Array, new: Array, slots: Int[Array, " P"], group: LayerGroup) -> Array:
    if group.scanned:  # [layers, S, ...]
        return old.at[:, slots].set(new, mode="drop")
    return old.at[slots].set(new, mode="drop")


class SlotBatch:
    """`num_slots` decode rows of one model under one KV policy.

    Every bucket must be one the policy can serve (`ValueError` otherwise,
    e.g. a budget smaller than the longest prompt's `full` cache)."""

    def __init__(
        self,
        generator: Generator,
        num_slots: int,
        buckets: tuple[int, ...],
        image_shape: tuple[int, ...],
        params,
    ):
        self.generator, self.num_slots, self.buckets = generator, num_slots, buckets
        self.policy = generator.policy
        self.image_shape = image_shape
        plans = [generator.plan(bucket) for bucket in buckets]  # raises on a policy a bucket cannot take
        self.groups = generator.groups()
        self.buffer_slots = tuple(max(plan.group(g.start, g.end)[2] for plan in plans) for g in self.groups)
        self._generators: dict[ModelConfig, Generator] = {generator.cfg: generator}
        self._inserts: dict[ModelConfig, object] = {}
        self._step = jax.jit(self._step_fn, donate_argnums=1)
        self.state = self._empty_state(params)

    def _generator_for(self, model_cfg: ModelConfig) -> Generator:
        """Prompts whose image sits elsewhere (a chat template's system turn) prefill under their own layout."""
        model_cfg = dataclasses.replace(model_cfg, remat=False)
        if model_cfg not in self._generators:
            g = self.generator
            self._generators[model_cfg] = Generator(
                model_cfg, g.policy, g.max_new_tokens, g.sampling, g.stop_ids, g.pad_id, mesh=g.mesh, rules=g.rules
            )
        return self._generators[model_cfg]

    def dummy_prompts(self, bucket: int, size: int) -> Prompts:
        """`size` blank prompts written nowhere: what warm-up compiles with."""
        batch = {
            "input_ids": np.zeros((size, bucket), np.int32),
            "text_mask": np.ones((size, bucket), bool),
            "pixels": np.zeros((size, *self.image_shape), np.float32),
        }
        return Prompts(
            batch,
            np.full(size, self.num_slots, np.int32),
            np.zeros(size, np.float32),
            np.ones(size, np.float32),
            np.zeros(size, np.uint32),
        )

    def _empty_state(self, params) -> SlotState:
        one = self.dummy_prompts(self.buckets[0], 1)
        shapes = jax.eval_shape(lambda p: self.generator.prefill_caches(p, one.batch, self.buffer_slots)[1], params)

        def slots_wide(leaf, group: LayerGroup):
            shape = list(leaf.shape)
            shape[1 if group.scanned else 0] = self.num_slots
            return jnp.zeros(shape, leaf.dtype)

        caches = tuple(jax.tree.map(lambda x, g=g: slots_wide(x, g), c) for g, c in zip(self.groups, shapes))
        empty = SlotState(
            caches=caches,
            last_token=jnp.zeros(self.num_slots, jnp.int32),
            next_pos=jnp.zeros(self.num_slots, jnp.int32),
            keys=jax.random.split(jax.random.key(0), self.num_slots),
            temperature=jnp.zeros(self.num_slots, jnp.float32),
            top_p=jnp.ones(self.num_slots, jnp.float32),
        )
        with self.generator.mesh_context():
            return jax.jit(self._constrained)(empty)

    def _constrained(self, state: SlotState) -> SlotState:
        """The state laid out one way whichever program made it (the empty
        state, insert, step): a program compiled for it never meets another
        layout and compiles again."""
        caches = tuple(
            jax.vmap(constrain_cache)(c) if g.scanned else constrain_cache(c) for g, c in zip(self.groups, state.caches)
        )
        rows = lambda x: sharding.constrain(x, ("batch",))
        return SlotState(
            caches,
            rows(state.last_token),
            rows(state.next_pos),
            rows(state.keys),
            rows(state.temperature),
            rows(state.top_p),
        )

    def _insert_fn(self, generator: Generator, params, state: SlotState, prompts: Prompts):
        logits, caches, prompt_lens = generator.prefill_caches(params, prompts.batch, self.buffer_slots)
        keys = jax.vmap(jax.random.key)(prompts.seeds)
        split = jax.vmap(jax.random.split)(keys)  # [P, 2]: this draw, and the slot's key from here on
        first = sample_rows(logits, split[:, 0], prompts.temperature, prompts.top_p)
        slots = prompts.slots
        written = tuple(
            jax.tree.map(lambda old, new, g=g: _write_rows(old, new, slots, g), old, new)
            for g, old, new in zip(self.groups, state.caches, caches)
        )
        state = SlotState(
            caches=written,
            last_token=state.last_token.at[slots].set(first, mode="drop"),
            next_pos=state.next_pos.at[slots].set(prompt_lens, mode="drop"),
            keys=state.keys.at[slots].set(split[:, 1], mode="drop"),
            temperature=state.temperature.at[slots].set(prompts.temperature, mode="drop"),
            top_p=state.top_p.at[slots].set(prompts.top_p, mode="drop"),
        )
        return self._constrained(state), first

    def _step_fn(self, params, state: SlotState):
        logits, caches = self.generator.next_logits(
            params, state.last_token[:, None], state.next_pos[:, None], state.caches
        )
        split = jax.vmap(jax.random.split)(state.keys)
        token = sample_rows(logits, split[:, 0], state.temperature, state.top_p)
        state = state.replace(caches=caches, last_token=token, next_pos=state.next_pos + 1, keys=split[:, 1])
        return self._constrained(state), token

    def insert(self, params, model_cfg: ModelConfig, prompts: Prompts) -> np.ndarray:
        """Prefills `prompts` into their slots; returns their first tokens [P]."""
        generator = self._generator_for(model_cfg)
        if generator.cfg not in self._inserts:
            self._inserts[generator.cfg] = jax.jit(
                lambda params, state, prompts: self._insert_fn(generator, params, state, prompts), donate_argnums=1
            )
        with self.generator.mesh_context():
            self.state, first = self._inserts[generator.cfg](params, self.state, prompts)
        return np.asarray(first)

    def step(self, params) -> np.ndarray:
        """One token for every slot (free ones decode garbage nobody reads); returns them [S]."""
        with self.generator.mesh_context():
            self.state, token = self._step(params, self.state)
        return np.asarray(token)

    def warm(self, params, sizes: tuple[int, ...], model_cfg: ModelConfig) -> None:
        """Compiles every program requests of `model_cfg`'s layout will run:
        the step, and insert per bucket and prefill size."""
        for bucket in self.buckets:
            for size in sizes:
                self.insert(params, model_cfg, self.dummy_prompts(bucket, size))
        self.step(params)
