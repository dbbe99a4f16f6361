"""The serving engine, pure over an explicit state (JetStream's
`engine_api.py` split): `prefill` prompts into decode `Rows` of their own
(caches, first tokens), `insert` those into the engine's state (`Rows` of
`num_rows`), `generate` one token for every row (`Generator.step`, the step
the Generator's loop runs too).

An `Engine` serves `num_rows` decode rows under one KV policy; the scheduler
(serving/scheduler.py) owns which request holds which row, and the state.
Prompts are prefilled a few at a time in eval.py's length buckets (one jitted
program per layout, bucket and prefill size), inserted with one program per
prefill size, and every row advances by one token with one program. Rows are
independent: a row's answer is the same whatever the other rows hold, so a
request decodes as it would alone. Every row's cache buffer is sized for the
longest bucket, so prompts of every length share one decode program; the
slots this adds are free (invalid) cache slots, which change nothing for
presses that append, and the presses that evict keep their budget-sized
buffer.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from skipvision_jax import sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.generate import Generator, Rows
from skipvision_jax.inference import LoadedModel, model_generator
from skipvision_jax.kvcache import KVPolicy, constrain_cache
from skipvision_jax.nn.decoder import LayerGroup


@flax.struct.dataclass
class Prompts:
    """Up to a prefill size of prompts of one layout and bucket, as numpy
    arrays padded to that size (padding rows repeat the first prompt and are
    inserted at row `num_rows`, out of range: their writes are dropped)."""

    batch: dict[str, np.ndarray]  # input_ids, text_mask [P, bucket]; pixels [P, H, W, C]
    temperature: np.ndarray  # [P] float32
    top_p: np.ndarray  # [P] float32
    seeds: np.ndarray  # [P] uint32: each request's PRNG seed


# One prompt prefix's captures, per layer group (`Generator.prefix_captures`, one row).
Prefix = tuple[dict[str, Array], ...]


def _write_rows(old: Array, new: Array, rows: Int[Array, " P"], group: LayerGroup) -> Array:
    at = (slice(None),) * group.rows_axis + (rows,)
    return old.at[at].set(new, mode="drop")


class Engine:
    """Prefill, insert and generate for `num_rows` decode rows of one model
    under one KV policy, all jitted. Every bucket must be one the policy can
    serve (`ValueError` otherwise, e.g. a budget smaller than the longest
    prompt's `full` cache)."""

    def __init__(self, generator: Generator, num_rows: int, buckets: tuple[int, ...], image_shape, params):
        """`generator` gives the model, policy, lengths, stop and pad ids and
        mesh; each row samples under its own request's settings."""
        self.num_rows, self.buckets, self.params, self.image_shape = num_rows, buckets, params, image_shape
        self._settings, self._generators = generator, {}
        self.generator = self._generator_for(generator.cfg)
        plans = [generator.plan(bucket) for bucket in buckets]  # raises on a policy a bucket cannot take
        self.groups = generator.groups()
        self.buffer_sizes = tuple(max(plan.group(g.start, g.end)[2] for plan in plans) for g in self.groups)
        self._prefills: dict[tuple[ModelConfig, bool], object] = {}  # by layout and whether prefixes are given
        self._prefix_programs: dict[ModelConfig, object] = {}
        self._insert = jax.jit(self._insert_fn, donate_argnums=1)
        self._generate = jax.jit(self._generate_fn, donate_argnums=1)

    def _generator_for(self, model_cfg: ModelConfig) -> Generator:
        """Prompts whose image sits elsewhere (a chat template's system turn) prefill under their own layout."""
        model_cfg = dataclasses.replace(model_cfg, remat=False)
        if model_cfg not in self._generators:
            g = self._settings
            self._generators[model_cfg] = Generator(
                model_cfg,
                g.policy,
                g.max_new_tokens,
                g.sampling,
                g.stop_ids,
                g.pad_id,
                mesh=g.mesh,
                rules=g.rules,
                per_row_sampling=True,
            )
        return self._generators[model_cfg]

    def dummy_prompts(self, bucket: int, size: int) -> Prompts:
        """`size` blank prompts: what warm-up compiles with."""
        batch = {
            "input_ids": np.zeros((size, bucket), np.int32),
            "text_mask": np.ones((size, bucket), bool),
            "pixels": np.zeros((size, *self.image_shape), np.float32),
        }
        return Prompts(batch, np.zeros(size, np.float32), np.ones(size, np.float32), np.zeros(size, np.uint32))

    def init_state(self) -> Rows:
        """Every row free."""
        one = self.dummy_prompts(self.buckets[0], 1)
        shapes = jax.eval_shape(
            lambda p: self.generator.prefill_caches(p, one.batch, self.buffer_sizes)[1], self.params
        )

        def rows_wide(leaf, group: LayerGroup):
            shape = list(leaf.shape)
            shape[group.rows_axis] = self.num_rows
            return jnp.zeros(shape, leaf.dtype)

        caches = tuple(jax.tree.map(lambda x, g=g: rows_wide(x, g), c) for g, c in zip(self.groups, shapes))
        empty = Rows(
            caches=caches,
            last_token=jnp.zeros(self.num_rows, jnp.int32),
            next_pos=jnp.zeros(self.num_rows, jnp.int32),
            rngs=jax.random.split(jax.random.key(0), self.num_rows),
            temperature=jnp.zeros(self.num_rows, jnp.float32),
            top_p=jnp.ones(self.num_rows, jnp.float32),
        )
        with self.generator.mesh_context():
            return jax.jit(self._constrained)(empty)

    def _constrained(self, state: Rows) -> Rows:
        """The state laid out one way whichever program made it (the empty
        state, insert, generate): a program compiled for it never meets
        another layout and compiles again."""
        caches = tuple(
            jax.vmap(constrain_cache)(c) if g.scanned else constrain_cache(c) for g, c in zip(self.groups, state.caches)
        )
        rows = lambda x: sharding.constrain(x, ("batch",))
        return Rows(
            caches,
            rows(state.last_token),
            rows(state.next_pos),
            rows(state.rngs),
            rows(state.temperature),
            rows(state.top_p),
        )

    def _prefill_fn(self, generator: Generator, params, prompts: Prompts, prefixes: tuple[Prefix, ...] | None) -> Rows:
        rngs = jax.vmap(jax.random.key)(prompts.seeds)
        if prefixes is not None:  # one per prompt: stacked into rows
            prefixes = tuple(
                {name: jnp.concatenate([p[i][name] for p in prefixes], axis=g.rows_axis) for name in prefixes[0][i]}
                for i, g in enumerate(self.groups)
            )
        rows, _ = generator.prefill_rows(
            params, prompts.batch, rngs, prompts.temperature, prompts.top_p, self.buffer_sizes, prefixes
        )
        return rows

    def _prefixes_fn(self, generator: Generator, params, prefix_ids, pixels) -> tuple[Prefix, ...]:
        captured = generator.prefix_captures(params, prefix_ids, {"pixels": pixels})
        one = lambda u: tuple(
            {name: jax.lax.slice_in_dim(x, u, u + 1, axis=g.rows_axis) for name, x in c.items()}
            for g, c in zip(self.groups, captured)
        )
        return tuple(one(u) for u in range(prefix_ids.shape[0]))

    def _insert_fn(self, prefix: Rows, state: Rows, rows: Int[Array, " P"]) -> Rows:
        caches = tuple(
            jax.tree.map(lambda old, new, g=g: _write_rows(old, new, rows, g), old, new)
            for g, old, new in zip(self.groups, state.caches, prefix.caches)
        )
        put = lambda old, new: old.at[rows].set(new, mode="drop")
        written = jax.tree.map(put, state.replace(caches=()), prefix.replace(caches=()))
        return self._constrained(written.replace(caches=caches))

    def _generate_fn(self, params, state: Rows) -> tuple[Rows, Int[Array, " R"]]:
        state, token, _ = self.generator.step(params, state)
        return self._constrained(state), token

    def prefill(self, model_cfg: ModelConfig, prompts: Prompts, prefixes: list[Prefix] | None = None) -> Rows:
        """The prompts' caches and first tokens (`model_cfg`: their layout);
        with `prefixes` (each prompt's, from `prefixes`), only what follows them runs."""
        generator = self._generator_for(model_cfg)
        shared = prefixes is not None
        if (generator.cfg, shared) not in self._prefills:
            self._prefills[generator.cfg, shared] = jax.jit(functools.partial(self._prefill_fn, generator))
        with self.generator.mesh_context():
            return self._prefills[generator.cfg, shared](
                self.params, prompts, None if prefixes is None else tuple(prefixes)
            )

    def prefix_length(self, model_cfg: ModelConfig) -> int | None:
        """The text ids before the image, which a shared prefix holds with
        it; None where prompts of this layout share no prefix."""
        generator = self._generator_for(model_cfg)
        return generator.cfg.layout.image_offset if generator.cfg.shares_prefixes else None

    def prefixes(self, model_cfg: ModelConfig, prefix_ids: np.ndarray, pixels: np.ndarray) -> list[Prefix]:
        """The forward of U prefixes (`prefix_ids` [U, prefix_length], their
        images' `pixels`), each its own `Prefix` to extend later."""
        generator = self._generator_for(model_cfg)
        if generator.cfg not in self._prefix_programs:
            self._prefix_programs[generator.cfg] = jax.jit(functools.partial(self._prefixes_fn, generator))
        with self.generator.mesh_context():
            return list(self._prefix_programs[generator.cfg](self.params, prefix_ids, pixels))

    def insert(self, prefix: Rows, state: Rows, rows: np.ndarray) -> Rows:
        """`state` with the prefix's prompts in `rows` (`num_rows`: written nowhere); donates `state`."""
        with self.generator.mesh_context():
            return self._insert(prefix, state, jnp.asarray(rows, jnp.int32))

    def generate(self, state: Rows) -> tuple[Rows, np.ndarray]:
        """One token for every row (free ones decode garbage nobody reads); donates `state`."""
        with self.generator.mesh_context():
            state, token = self._generate(self.params, state)
        return state, np.asarray(token)

    def warm(self, sizes: tuple[int, ...], model_cfg: ModelConfig, shared_prefixes: bool = False) -> None:
        """Compiles every program requests of `model_cfg`'s layout will run:
        prefill per bucket and prefill size (after shared prefixes, and the
        prefixes per size, where the scheduler shares them), insert per size,
        generate."""
        state = self.init_state()
        prefix_length = self.prefix_length(model_cfg) if shared_prefixes else None
        for size in sizes:
            if prefix_length is not None:
                blank = self.dummy_prompts(self.buckets[0], size).batch
                prefixes = self.prefixes(model_cfg, blank["input_ids"][:, :prefix_length], blank["pixels"])
            for bucket in self.buckets:
                prompts = self.dummy_prompts(bucket, size)
                rows = self.prefill(model_cfg, prompts, None if prefix_length is None else prefixes)
                state = self.insert(rows, state, np.full(size, self.num_rows))
        self.generate(state)


def model_engines(loaded: LoadedModel, num_rows: int, max_new_tokens: int, buckets: tuple[int, ...]):
    """The engine factory of a loaded model: KV policy -> its `Engine`."""
    vision = loaded.model_cfg.vision
    image_shape = (vision.image_size, vision.image_size, vision.num_channels)

    def make(policy: KVPolicy) -> Engine:
        generator = model_generator(loaded, loaded.model_cfg, policy, max_new_tokens)
        return Engine(generator, num_rows, buckets, image_shape, loaded.params)

    return make
