"""Jitted prefill and a single jitted decode loop over fixed-budget KV caches.

    generator = Generator(model_cfg, policy, max_new_tokens=16, sampling=Sampling())
    state = generator.prefill(params, batch)          # jitted: prompt -> caches + first token
    state = generator.decode(params, state)           # jitted: one lax.while_loop
    state.tokens                                      # [B, max_new_tokens]

Prompts of different lengths share a batch: the text is right-padded and
masked; each row decodes at its own positions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from skipvision_jax import kvcache, sharding
from skipvision_jax.config import ModelConfig
from skipvision_jax.kvcache import CachePlan, KVPolicy, LayerCache
from skipvision_jax.nn.decoder import PREFIX_QUERIES, QUERY_STATES, LayerGroup, layer_groups, prefill_captures
from skipvision_jax.nn.layers import rope_tables
from skipvision_jax.nn.vlm import SkipVisionVLM
from skipvision_jax.partition import SequenceLayout, in_range
from skipvision_jax.presses import PromptKeys


@dataclasses.dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"sampling.temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p: must be in (0, 1], got {self.top_p}")

    def per_row(self, rows: int) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
        """`sample_rows`'s temperature (0: greedy) and top-p, the same for `rows` rows."""
        temperature = 0.0 if self.greedy else self.temperature
        return jnp.full(rows, temperature, jnp.float32), jnp.full(rows, self.top_p, jnp.float32)


def top_p_cut(logits: Float[Array, "B V"], top_p: float | Float[Array, "B 1"]) -> Float[Array, "B V"]:
    """Nucleus sampling's cut: -inf outside the smallest set of tokens whose
    mass reaches `top_p` (one value, or one per row)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is < top_p.
    cutoff_index = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None], axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_rows(
    logits: Float[Array, "B V"],
    rngs: jax.Array,
    temperature: Float[Array, " B"],
    top_p: Float[Array, " B"],
    top_k: int = 0,
    greedy: bool = False,
) -> Int[Array, " B"]:
    """The one sampler: each row under its own settings and PRNG key (a
    server's rows hold different requests); temperature 0 is greedy, as in
    OpenAI's API; `top_k` 0 cuts nothing, nor does a top_p of 1. `greedy`
    (static): every row is, so no draw is traced (a decode step then costs
    an argmax, not a sort of the vocabulary)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = temperature > 0
    scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    scaled = jnp.where((top_p < 1.0)[:, None], top_p_cut(scaled, top_p[:, None]), scaled)
    drawn = jax.vmap(jax.random.categorical)(rngs, scaled)
    return jnp.where(sampled, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def sample(logits: Float[Array, "B V"], rng: jax.Array, sampling: Sampling) -> Int[Array, " B"]:
    """`sample_rows` with one setting for every row, each row's key split from `rng`."""
    rows = logits.shape[0]
    temperature, top_p = sampling.per_row(rows)
    return sample_rows(logits, jax.random.split(rng, rows), temperature, top_p, sampling.top_k, sampling.greedy)


@flax.struct.dataclass
class Rows:
    """The decode state of a batch of rows, one request each: what the
    Generator's loop and the server's engine both step."""

    caches: tuple[LayerCache, ...]  # one per decoder layer group; rows lead (scanned groups: after the layers axis)
    last_token: Int[Array, " B"]  # the token each row feeds next
    next_pos: Int[Array, " B"]  # its position
    rngs: jax.Array  # [B] PRNG keys: a row's draws depend on its own key only
    temperature: Float[Array, " B"]  # 0: greedy
    top_p: Float[Array, " B"]


@flax.struct.dataclass
class DecodeState:
    """The Generator's loop: its rows, and the answers so far."""

    rows: Rows
    step: Int[Array, ""]  # tokens generated so far
    tokens: Int[Array, "B N"]  # N = max_new_tokens; pad_id after a stop token
    done: Bool[Array, " B"]
    logits: Float[Array, "B N V"] | None = None  # kept only with record_logits (tests)

    @property
    def caches(self) -> tuple[LayerCache, ...]:
        return self.rows.caches

    @property
    def next_pos(self) -> Int[Array, " B"]:
        return self.rows.next_pos


class Generator:
    """Prefill and decode for one (model, policy, sampling, length) setting.

    Both functions are jitted once per input shape: repeated prompts of the
    same padded length never recompile, and the decode loop is one
    `lax.while_loop`, so steps never do either."""

    def __init__(
        self,
        cfg: ModelConfig,
        policy: KVPolicy,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        stop_ids: tuple[int, ...] = (),
        pad_id: int = 0,
        record_logits: bool = False,
        mesh: Mesh | None = None,
        rules=sharding.DEFAULT_RULES,
        per_row_sampling: bool = False,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        self.cfg = dataclasses.replace(cfg, remat=False)
        self.model = SkipVisionVLM(self.cfg)
        self.policy, self.max_new_tokens, self.sampling = policy, max_new_tokens, sampling
        # Every row greedy (the Generator's own loop); rows a server fills decide each for itself.
        self.greedy = sampling.greedy and not per_row_sampling
        self.stop_ids, self.pad_id, self.record_logits = tuple(stop_ids), pad_id, record_logits
        # On a mesh: batch rows over the data axes, KV heads over `tensor`
        # (params are expected already placed, see sharding.tree_shardings).
        self.mesh, self.rules = mesh, rules
        self._prefill_jit = jax.jit(self._prefill)
        self._decode_jit = jax.jit(self._decode, donate_argnums=1)

    def mesh_context(self):
        """Where this generator's programs trace and run: its mesh and rules, if any."""
        return contextlib.nullcontext() if self.mesh is None else sharding.activate(self.mesh, self.rules)

    def prefill(self, params, batch: dict, rng: jax.Array) -> DecodeState:
        """Prompt -> caches and the first token (jitted)."""
        if self.mesh is not None:
            batch = {
                k: jax.device_put(np.asarray(v), sharding.rows_sharding(self.mesh, np.shape(v)))
                for k, v in batch.items()
            }
        with self.mesh_context():
            return self._prefill_jit(params, batch, rng)

    def decode(self, params, state: DecodeState) -> DecodeState:
        """The rest of the answer in one jitted `lax.while_loop`."""
        with self.mesh_context():
            return self._decode_jit(params, state)

    def plan(self, num_text: int) -> CachePlan:
        """The caches' static sizes for prompts of `num_text` padded text tokens."""
        return CachePlan.make(self.cfg, self.policy, num_text, self.max_new_tokens)

    def groups(self) -> list[LayerGroup]:
        """The decoder's layer groups, one cache each (scanned groups stack their layers)."""
        return layer_groups(self.cfg.decoder.num_layers, self.cfg.skip_layers, self.cfg.scan_layers)

    def _is_stop(self, tokens):
        return (
            jnp.isin(tokens, jnp.asarray(self.stop_ids, jnp.int32)) if self.stop_ids else jnp.zeros(tokens.shape, bool)
        )

    def prefill_caches(
        self,
        params,
        batch: dict,
        buffer_sizes: tuple[int, ...] | None = None,
        prefixes: tuple[dict[str, Array], ...] | None = None,
    ) -> tuple[Float[Array, "B V"], tuple[LayerCache, ...], Int[Array, " B"]]:
        """The prompt's forward (traced inside the caller's jit): the logits
        after each row's last prompt token, the caches the policy keeps (one
        per layer group, in buffers of `buffer_sizes` slots where given: a
        server's slots hold prompts of every length), and each row's prompt
        length. Given `prefixes` (each row's `prefix_captures`, gathered to
        the rows), or a batch marked by `share_prefixes`, only what follows
        each row's prefix runs."""
        input_ids, text_mask = batch["input_ids"], batch["text_mask"]
        plan = self.plan(input_ids.shape[1])
        layout = plan.layout
        length = layout.length
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (input_ids.shape[0], length))
        image = {"pixels": batch["pixels"]} if "pixels" in batch else {"vision_features": batch["vision_features"]}
        key_valid = layout.key_valid(text_mask)
        # Real tokens are contiguous from 0 (text is right-padded), so a row's
        # prompt length is its count of valid rows.
        prompt_lens = key_valid.sum(axis=1).astype(jnp.int32)
        scored = self.policy.scored_queries(positions, key_valid, prompt_lens)
        if prefixes is None and "prefix_rows" in batch:
            prefix_rows = batch["prefix_rows"]
            distinct = self.prefix_captures(
                params,
                input_ids[prefix_rows, : self.cfg.layout.image_offset],
                {name: x[prefix_rows] for name, x in image.items()},
            )
            prefixes = self.gather_prefixes(distinct, batch["prefix_index"])
        if prefixes is not None:
            logits, captured = self.model.apply(
                {"params": params},
                input_ids,
                text_mask,
                prefixes,
                scored,
                method=SkipVisionVLM.extend,
                mutable=self._sown,
            )
        else:
            logits, captured = self.model.apply(
                {"params": params},
                input_ids,
                text_mask,
                **image,
                scored=scored,
                method=SkipVisionVLM.prefill,
                mutable=self._sown,
            )
        captured = captured["prefill"]["decoder"]
        cached = key_valid
        if not self.cfg.skip.text_sees_skipped:
            # No row after q2 reads the skipped rows, the new tokens included:
            # their keys are dead after prefill, under every policy.
            cached = key_valid & ~in_range(positions, layout.skipped_range)
        caches = []
        for index, group in enumerate(self.groups()):
            if "fastv_index" in captured and group.start >= self.cfg.fastv.layer:
                # FastV removed visual rows: these layers cache only the rows that stayed.
                kept_rows = captured["fastv_index"][0]
                rows = tuple(jnp.take_along_axis(x, kept_rows, axis=1) for x in (positions, cached))
            else:
                rows = (positions, cached)
            keep, num_slots, buffer_size = plan.group(group.start, group.end)
            if buffer_sizes is not None:
                # Only free slots are added: a buffer the policy fills and evicts from keeps its size.
                if buffer_sizes[index] < buffer_size:
                    raise ValueError(
                        f"buffer_sizes: group {index} needs {buffer_size} slots, got {buffer_sizes[index]}"
                    )
                buffer_size = buffer_sizes[index]
            layer_keep = jnp.asarray(keep)[:, prompt_lens]  # [layers, B]: each row's count, by its prompt length
            layer_cache = functools.partial(self._layer_cache, *rows, prompt_lens, layout, num_slots, buffer_size)
            sown = prefill_captures(captured, group)
            caches.append(
                jax.vmap(layer_cache)(sown, layer_keep) if group.scanned else layer_cache(sown, layer_keep[0])
            )
        return logits, tuple(caches), prompt_lens

    @property
    def _sown(self) -> list[str]:
        """The collections a prefill fills: keys, values, scores; the query states where the press reads them."""
        return ["prefill", QUERY_STATES] if self.policy.press.reads_query_states else ["prefill"]

    def prefix_captures(
        self, params, prefix_ids: Int[Array, "U P"], image: dict[str, Array]
    ) -> tuple[dict[str, Array], ...]:
        """The forward of U distinct prefixes (the text before the image, the
        visual block; traced inside the caller's jit): per layer group, what
        `prefill_caches` reads of each to extend it (keys, values, queries;
        U rows on the group's `rows_axis`)."""
        _, captured = self.model.apply(
            {"params": params},
            prefix_ids,
            **image,
            method=SkipVisionVLM.prefill_prefix,
            mutable=[*self._sown, PREFIX_QUERIES],
        )
        return tuple(prefill_captures(captured["prefill"]["decoder"], group) for group in self.groups())

    def gather_prefixes(
        self, captures: tuple[dict[str, Array], ...], index: Int[Array, " B"]
    ) -> tuple[dict[str, Array], ...]:
        """`prefix_captures` of U prefixes as B rows, row b holding prefix `index[b]`."""
        return tuple(
            {name: jnp.take(x, index, axis=group.rows_axis) for name, x in captured.items()}
            for group, captured in zip(self.groups(), captures)
        )

    def prefill_rows(
        self,
        params,
        batch: dict,
        rngs: jax.Array,
        temperature: Float[Array, " B"],
        top_p: Float[Array, " B"],
        buffer_sizes: tuple[int, ...] | None = None,
        prefixes: tuple[dict[str, Array], ...] | None = None,
    ) -> tuple[Rows, Float[Array, "B V"]]:
        """The prompts as decode rows, each with its first token drawn under
        its own settings and key (traced inside the caller's jit), and the
        logits that token was drawn from (`prefixes`: see `prefill_caches`)."""
        logits, caches, prompt_lens = self.prefill_caches(params, batch, buffer_sizes, prefixes)
        split = jax.vmap(jax.random.split)(rngs)  # [B, 2]: this draw, and the row's key from here on
        first = sample_rows(logits, split[:, 0], temperature, top_p, self.sampling.top_k, self.greedy)
        return Rows(caches, first, prompt_lens, split[:, 1], temperature, top_p), logits

    def step(self, params, rows: Rows) -> tuple[Rows, Int[Array, " B"], Float[Array, "B V"]]:
        """One token for every row: the model's decode step, then each row's
        draw; and the logits it was drawn from."""
        # Ties the weights to this step's state. A weight's cast is
        # loop-invariant, and XLA would hoist every one out of the decode loop
        # and hold them all: on XLA:CPU, which computes a bf16 product in f32
        # over an f32 copy of its weight, 26 GB beside 7B's 13 GB of bf16
        # weights (f32 master weights cast to bf16 would add half). Tied, each
        # copy is made in the step and freed after it
        # (tests/test_bounded_memory.py). No-op on the values.
        params, rows = jax.lax.optimization_barrier((params, rows))
        logits, caches = self.next_logits(params, rows.last_token[:, None], rows.next_pos[:, None], rows.caches)
        split = jax.vmap(jax.random.split)(rows.rngs)
        token = sample_rows(logits, split[:, 0], rows.temperature, rows.top_p, self.sampling.top_k, self.greedy)
        rows = rows.replace(caches=caches, last_token=token, next_pos=rows.next_pos + 1, rngs=split[:, 1])
        return rows, token, logits

    def _prefill(self, params, batch: dict, rng: jax.Array) -> DecodeState:
        batch_size = batch["input_ids"].shape[0]
        temperature, top_p = self.sampling.per_row(batch_size)
        rows, logits = self.prefill_rows(params, batch, jax.random.split(rng, batch_size), temperature, top_p)
        tokens = jnp.full((batch_size, self.max_new_tokens), self.pad_id, jnp.int32).at[:, 0].set(rows.last_token)
        recorded = None
        if self.record_logits:
            recorded = jnp.zeros((batch_size, self.max_new_tokens, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
        return DecodeState(
            rows=rows,
            step=jnp.ones((), jnp.int32),
            tokens=tokens,
            done=self._is_stop(rows.last_token),
            logits=recorded,
        )

    def _layer_cache(
        self,
        positions: Int[Array, "B L"],
        key_valid: Bool[Array, "B L"],
        prompt_lens: Int[Array, " B"],
        layout: SequenceLayout,
        num_slots: int,
        buffer_size: int,
        sown: dict[str, Array],
        keep: Int[Array, " B"],
    ) -> LayerCache:
        """One layer's cache from what it sowed at prefill, under the policy:
        `keep[row]` prompt keys per KV head, ranked among `num_slots`, in a
        buffer of `buffer_size` slots."""
        decoder = self.cfg.decoder
        keys = PromptKeys(
            k=sown["k"],
            v=sown["v"],
            positions=positions,
            key_valid=key_valid,
            prompt_lens=prompt_lens,
            attention=sown.get("key_scores"),
            query_states=sown.get("query_states"),
            rope=lambda at: rope_tables(at, decoder.resolved_head_dim, decoder.rope_theta, decoder.rope_llama3_scaling),
            skipped=layout.skipped_range,
        )
        priority, score = kvcache.prompt_scores(self.policy, keys)
        return kvcache.compact(keys, priority, score, keep, num_slots, buffer_size)

    def next_logits(
        self, params, tokens: Int[Array, "B 1"], positions: Int[Array, "B 1"], caches: tuple[LayerCache, ...]
    ) -> tuple[Float[Array, "B V"], tuple[LayerCache, ...]]:
        """One decode step of the model: each row's token at its position, against (and into) its caches."""
        logits, caches = self.model.apply(
            {"params": params}, tokens, positions, caches, self.policy, method=SkipVisionVLM.decode_step
        )
        return logits, tuple(caches)

    def _decode_step(self, params, state: DecodeState) -> DecodeState:
        rows, token, logits = self.step(params, state.rows)
        recorded = state.logits.at[:, state.step].set(logits) if self.record_logits else None
        token = jnp.where(state.done, self.pad_id, token)
        return DecodeState(
            rows=rows.replace(last_token=token),
            step=state.step + 1,
            tokens=state.tokens.at[:, state.step].set(token),
            done=state.done | self._is_stop(token),
            logits=recorded,
        )

    def _decode(self, params, state: DecodeState) -> DecodeState:
        keep_going = lambda s: (s.step < self.max_new_tokens) & ~jnp.all(s.done)
        final = jax.lax.while_loop(keep_going, lambda s: self._decode_step(params, s), state)
        # Every process reads the answer: tokens end replicated.
        return final.replace(tokens=sharding.constrain(final.tokens, (None, None)))

    def __call__(self, params, batch: dict, rng: jax.Array | None = None) -> DecodeState:
        return self.decode(params, self.prefill(params, batch, jax.random.key(0) if rng is None else rng))
