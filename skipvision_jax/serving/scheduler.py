"""Continuous batching: one thread owns the device, the engines' states and
which request holds which decode row.

Between two decode steps it prefills waiting requests into free rows (a few
at a time, grouped by KV setting, layout and length bucket), then advances
every busy engine by one token; a row that stops, reaches its length or whose
client went away is free at once. Requests under another KV policy or budget
mode decode in an engine of their own, made (and compiled) on this thread when
its first request is admitted. HTTP handlers talk to it through a narrow
front: `encode`, `admit` (checks a KV setting, compiles nothing), `submit`
with the `emit` callback of each request, and `stats`. The engines come from
a factory, so the driver is tested against a fake one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from skipvision_jax.batching import bucket_for, collate, prefill_sizes
from skipvision_jax.compilation import CompileCounter
from skipvision_jax.config import ModelConfig
from skipvision_jax.data.llava import Turn
from skipvision_jax.inference import LoadedModel
from skipvision_jax.kvcache import CachePlan, KVPolicy
from skipvision_jax.serving.engine import Engine, Prompts, model_engines
from skipvision_jax.serving.prefix_cache import PrefixCache, prefix_key

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: try again later (HTTP 503)."""


class ShuttingDown(RuntimeError):
    """The server stops: it takes no new request (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    policy: KVPolicy  # the default; requests may name another
    max_batch: int = 16  # decode rows per KV setting
    max_queue: int = 256  # requests waiting for a slot
    max_new_tokens: int = 128  # a request's max_tokens at most; sizes the caches
    max_prefill: int = 8  # prompts prefilled together
    max_kv_settings: int = 4  # engines held at once (each holds max_batch rows of caches)
    warmup: bool = True  # compile the default setting's programs at start-up
    prefix_cache_mb: float = 1024  # prompt prefixes (text before the image, visual block) kept; 0: none shared

    def __post_init__(self):
        for field in ("max_batch", "max_queue", "max_new_tokens", "max_prefill", "max_kv_settings"):
            if getattr(self, field) < 1:
                raise ValueError(f"--{field.replace('_', '-')}: must be >= 1, got {getattr(self, field)}")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"--prefix-cache-mb: must be >= 0, got {self.prefix_cache_mb}")


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request hears from the scheduler: new text while it streams, then the end."""

    delta: str = ""
    finish_reason: str | None = None  # stop | length, on the last event
    text: str = ""  # the whole answer, on the last event
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass
class Generation:
    """One request as the scheduler sees it."""

    ids: np.ndarray  # [T] prompt text ids
    pixels: np.ndarray  # [H, W, C]
    model_cfg: ModelConfig  # its layout
    policy: KVPolicy
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    emit: Callable[[Event], None]  # called from the scheduler thread
    ignore_eos: bool = False  # vLLM's extension for load tests: answers run to max_tokens
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters streamed so far


def visible_answer(text: str, stop: tuple[str, ...], finished: bool) -> tuple[str, bool]:
    """(the text a client may see, whether a stop string ended it). OpenAI's
    `stop`: the answer ends before the first stop string. While the answer
    goes on, a tail that may yet become a stop string, or an unfinished
    character (U+FFFD from a partial multi-byte token), is held back."""
    hits = [text.find(s) for s in stop if s and s in text]
    if hits:
        return text[: min(hits)], True
    if finished:
        return text, False
    hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold].rstrip("\ufffd"), False


class Scheduler:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: ServeSettings,
        engines: Callable[[KVPolicy], Engine] | None = None,
    ):
        """`engines` makes the engine of a KV setting (default: the model's,
        `model_engines`)."""
        self.loaded, self.settings = loaded, settings
        self.buckets = loaded.length_buckets()
        self.sizes = prefill_sizes(min(settings.max_prefill, settings.max_batch))
        self._make_engine = engines or model_engines(loaded, settings.max_batch, settings.max_new_tokens, self.buckets)
        self.compilations = CompileCounter()
        self.prefix_cache = PrefixCache(int(settings.prefix_cache_mb * 2**20)) if settings.prefix_cache_mb else None
        self._engines: dict[KVPolicy, Engine] = {}
        self._states: dict[KVPolicy, object] = {}
        self._rows: dict[KVPolicy, list[Generation | None]] = {}  # which request holds each row, per KV setting
        self._waiting: collections.deque[Generation] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.counts = collections.Counter()
        self.busy_s = (
            0.0  # wall seconds of device work (prefill, insert, steps): its share of a run is the device's load
        )
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.admit(settings.policy)  # a default setting the buckets cannot take fails at start-up

    # ---- the front: called from HTTP handlers -------------------------------------------------

    @property
    def default_policy(self) -> KVPolicy:
        return self.settings.policy

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    def encode(self, image: Image.Image, turns: list[Turn]) -> tuple[dict, ModelConfig]:
        """A request's prompt: (a batch of one, its layout); ValueError if it does not fit."""
        return self.loaded.encode(image, turns)

    def admit(self, policy: KVPolicy) -> None:
        """Takes a KV setting for requests to name; ValueError if it cannot
        serve every bucket or the server holds its limit. Compiles nothing."""
        with self._cv:
            if policy in self._rows:
                return
            if len(self._rows) >= self.settings.max_kv_settings:
                raise ValueError(
                    f"kv_policy: the server holds its limit of {self.settings.max_kv_settings} KV settings "
                    f"({', '.join(str(p) for p in self._rows)}); use one of them"
                )
            for bucket in self.buckets:
                CachePlan.make(self.loaded.model_cfg, policy, bucket, self.settings.max_new_tokens)
            self._rows[policy] = [None] * self.settings.max_batch

    def submit(self, generation: Generation) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.settings.max_queue:
                self.counts["refused_queue_full"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the limit (--max-queue)")
            self._waiting.append(generation)
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            return {
                "status": "stopping" if self._stopping else "ok",
                "slots": self.settings.max_batch,
                "slots_busy": self._busy_rows(),
                "waiting": len(self._waiting),
                "compilations": self.compilations.count,
                "kv_settings": [str(p) for p in self._rows],
                "busy_s": self.busy_s,
                **(self.prefix_cache.stats() if self.prefix_cache else {}),
                **self.counts,
            }

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.settings.warmup:
            self._engine(self.settings.policy).warm(self.sizes, self._usual_layout(), self.prefix_cache is not None)
        self._thread.start()

    def _usual_layout(self) -> ModelConfig:
        """The layout of a one-question prompt (a chat template places the image after its own prefix)."""
        size = self.loaded.model_cfg.vision.image_size
        blank = Image.new("RGB", (size, size))
        try:
            return self.loaded.encode(blank, [Turn("user", "What is in the image?")])[1]
        except ValueError:  # a prompt format that cannot take the words: its base layout
            return self.loaded.model_cfg

    def stop(self, timeout: float = 30.0) -> None:
        """Takes no new request; the thread ends once the accepted ones are answered."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        self.compilations.close()

    # ---- the scheduler thread -----------------------------------------------------------------

    def _busy_rows(self) -> int:
        return sum(o is not None for rows in self._rows.values() for o in rows)

    def _engine(self, policy: KVPolicy) -> Engine:
        """The setting's engine and its state, made on first use (on this thread: it compiles)."""
        if policy not in self._engines:
            engine = self._make_engine(policy)
            self._states[policy] = engine.init_state()
            self._engines[policy] = engine
        return self._engines[policy]

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._busy_rows() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._waiting and not self._busy_rows():
                    return
                admissions = self._admit()
                policies = list(self._rows)
            for policy, model_cfg, bucket, group in admissions:
                self._guarded([g for _, g in group], functools.partial(self._prefill, policy, model_cfg, bucket, group))
            for policy in policies:
                busy = [g for g in self._rows[policy] if g is not None]
                if busy:
                    self._guarded(busy, functools.partial(self._advance, policy))

    def _admit(self) -> list[tuple[KVPolicy, ModelConfig, int, list[tuple[int, Generation]]]]:
        """Waiting requests into free rows, oldest first, grouped for prefill (under the lock)."""
        free = {p: [i for i, o in enumerate(rows) if o is None] for p, rows in self._rows.items()}
        groups: dict[tuple, list[tuple[int, Generation]]] = {}
        admissions = []
        for generation in list(self._waiting):
            if generation.cancelled.is_set():
                self._waiting.remove(generation)
                self.counts["cancelled"] += 1
                continue
            if not free[generation.policy]:
                continue
            key = (generation.policy, generation.model_cfg, bucket_for(len(generation.ids), self.buckets))
            group = groups.setdefault(key, [])
            if len(group) == self.sizes[-1]:  # full: a new group of the same key
                admissions.append((*key, group))
                group = groups[key] = []
            row = free[generation.policy].pop(0)
            self._rows[generation.policy][row] = generation
            group.append((row, generation))
            self._waiting.remove(generation)
        return admissions + [(*key, group) for key, group in groups.items() if group]

    def _prefill(self, policy, model_cfg, bucket, group: list[tuple[int, Generation]]) -> None:
        engine = self._engine(policy)
        size = bucket_for(len(group), self.sizes)
        generations = [g for _, g in group]
        pad = size - len(group)
        prompts = Prompts(
            collate(generations, bucket, size, self.loaded.pad_id),
            np.array([g.temperature for g in generations] + [0.0] * pad, np.float32),
            np.array([g.top_p for g in generations] + [1.0] * pad, np.float32),
            np.array([g.seed for g in generations] + [0] * pad, np.uint32),
        )
        prefixes = self._shared_prefixes(policy, engine, model_cfg, generations)
        prefilled = engine.prefill(model_cfg, prompts, None if prefixes is None else prefixes + [prefixes[0]] * pad)
        rows = np.array([row for row, _ in group] + [self.settings.max_batch] * pad, np.int32)
        self._states[policy] = engine.insert(prefilled, self._states[policy], rows)
        for (row, generation), token in zip(group, np.asarray(prefilled.last_token)):
            self._accept(policy, row, generation, int(token))

    def _shared_prefixes(self, policy, engine: Engine, model_cfg, generations: list[Generation]) -> list | None:
        """Each request's prefix forward: from the cache, or computed once for
        every request of the batch that shares it (and cached); None where
        the prompts share none (no cache, FastV, a prompt that ends in its prefix)."""
        length = engine.prefix_length(model_cfg) if self.prefix_cache else None
        if length is None or any(len(g.ids) <= length for g in generations):
            return None
        keys = [prefix_key((policy, model_cfg), g.pixels, g.ids[:length]) for g in generations]
        found, missing = self.prefix_cache.lookup(keys)
        if missing:
            holders = [generations[keys.index(key)] for key in missing]
            holders += [holders[0]] * (bucket_for(len(holders), self.sizes) - len(holders))
            made = engine.prefixes(
                model_cfg, np.stack([g.ids[:length] for g in holders]), np.stack([g.pixels for g in holders])
            )
            for key, prefix in zip(missing, made):
                found[key] = prefix
                self.prefix_cache.put(key, prefix)
        return [found[key] for key in keys]

    def _advance(self, policy: KVPolicy) -> None:
        self._states[policy], tokens = self._engines[policy].generate(self._states[policy])
        for row, generation in enumerate(self._rows[policy]):
            if generation is not None:
                self._accept(policy, row, generation, int(tokens[row]))

    def _accept(self, policy: KVPolicy, row: int, generation: Generation, token: int) -> None:
        """A new token of a request: its stream's next text, or its end."""
        if generation.cancelled.is_set():  # its client went away: its row is free at once
            self._rows[policy][row] = None
            self.counts["cancelled"] += 1
            return
        generation.tokens.append(token)
        if token in self.loaded.stop_ids and not generation.ignore_eos:
            return self._finish(policy, row, generation, "stop")
        if generation.stream or generation.stop:
            text, stopped = visible_answer(self.loaded.decode(generation.tokens), generation.stop, finished=False)
            if stopped:
                return self._finish(policy, row, generation, "stop")
            if generation.stream and len(text) > generation.sent:
                generation.emit(Event(delta=text[generation.sent :]))
                generation.sent = len(text)
        if len(generation.tokens) >= generation.max_tokens:
            self._finish(policy, row, generation, "length")

    def _finish(self, policy: KVPolicy, row: int, generation: Generation, reason: str) -> None:
        answer = (
            generation.tokens[:-1]
            if reason == "stop" and generation.tokens[-1] in self.loaded.stop_ids
            else generation.tokens
        )
        text, _ = visible_answer(self.loaded.decode(answer), generation.stop, finished=True)
        self._rows[policy][row] = None
        self.counts["completed"] += 1
        generation.emit(Event(text[generation.sent :], reason, text, completion_tokens=len(generation.tokens)))

    def _guarded(self, generations: list[Generation], work: Callable[[], None]) -> None:
        """Runs device work; if it fails, its requests get the error, their rows are freed, and serving goes on."""
        start = time.perf_counter()
        try:
            work()
            self.busy_s += time.perf_counter() - start
        except Exception as err:  # one failed batch must not stop the server
            log.exception("device work failed")
            for generation in generations:
                for rows in self._rows.values():
                    for row, holder in enumerate(rows):
                        if holder is generation:
                            rows[row] = None
                generation.emit(Event(error=f"internal error: {type(err).__name__}: {err}"))
