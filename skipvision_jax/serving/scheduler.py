"""Continuous batching: one thread owns the device and its decode slots.

Between two decode steps it prefills waiting requests into free slots (a few
at a time, grouped by KV setting, layout and length bucket), then advances
every busy slot batch by one token; a row that stops, reaches its length or
whose client went away frees its slot at once. Requests under another KV
policy or budget mode decode in a slot batch of their own. HTTP handlers talk
to it through `submit` and the `emit` callback of each request.
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

from skipvision_jax.batching import bucket_for, collate, length_buckets, prefill_sizes
from skipvision_jax.compilation import CompileCounter
from skipvision_jax.config import ModelConfig
from skipvision_jax.data.llava import Turn
from skipvision_jax.generate import Generator
from skipvision_jax.inference import LoadedModel
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.serving.slots import Prompts, SlotBatch

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: try again later (HTTP 503)."""


class ShuttingDown(RuntimeError):
    """The server stops: it takes no new request (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    policy: KVPolicy  # the default; requests may name another
    max_batch: int = 16  # decode slots per KV setting
    max_queue: int = 256  # requests waiting for a slot
    max_new_tokens: int = 128  # a request's max_tokens at most; sizes the caches
    max_prefill: int = 8  # prompts prefilled together
    max_kv_settings: int = 4  # slot batches held at once (each holds max_batch caches)
    warmup: bool = True  # compile the default setting's programs at start-up

    def __post_init__(self):
        for field in ("max_batch", "max_queue", "max_new_tokens", "max_prefill", "max_kv_settings"):
            if getattr(self, field) < 1:
                raise ValueError(f"--{field.replace('_', '-')}: must be >= 1, got {getattr(self, field)}")


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
    def __init__(self, loaded: LoadedModel, settings: ServeSettings):
        self.loaded, self.settings = loaded, settings
        self.buckets = length_buckets(loaded.max_text_len)
        self.sizes = prefill_sizes(min(settings.max_prefill, settings.max_batch))
        vision = loaded.model_cfg.vision
        self.image_shape = (vision.image_size, vision.image_size, vision.num_channels)
        self.compilations = CompileCounter()
        self._batches: dict[KVPolicy, SlotBatch] = {}
        self._occupants: dict[KVPolicy, list[Generation | None]] = {}
        self._waiting: collections.deque[Generation] = collections.deque()
        self._cv = threading.Condition()
        self._create_lock = threading.Lock()
        self._stopping = False
        self.counts = collections.Counter()
        self.busy_s = (
            0.0  # wall seconds of device work (prefill, insert, steps): its share of a run is the device's load
        )
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self.slot_batch(settings.policy)  # a default setting the buckets cannot take fails at start-up

    # ---- called from HTTP handlers ------------------------------------------------------------

    def slot_batch(self, policy: KVPolicy) -> SlotBatch:
        """The slot batch of a KV setting, made on first use; ValueError if the
        setting cannot serve every bucket or the server holds its limit."""
        with self._create_lock:
            if policy not in self._batches:
                if len(self._batches) >= self.settings.max_kv_settings:
                    raise ValueError(
                        f"kv_policy: the server holds its limit of {self.settings.max_kv_settings} KV settings "
                        f"({', '.join(describe(p) for p in self._batches)}); use one of them"
                    )
                loaded = self.loaded
                generator = Generator(
                    loaded.model_cfg,
                    policy,
                    self.settings.max_new_tokens,
                    stop_ids=loaded.stop_ids,
                    pad_id=loaded.pad_id,
                    mesh=loaded.mesh,
                    rules=loaded.rules,
                )
                batch = SlotBatch(generator, self.settings.max_batch, self.buckets, self.image_shape, loaded.params)
                with self._cv:
                    self._occupants[policy] = [None] * self.settings.max_batch
                    self._batches[policy] = batch
            return self._batches[policy]

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
                "slots_busy": self._busy_slots(),
                "waiting": len(self._waiting),
                "compilations": self.compilations.count,
                "kv_settings": [describe(p) for p in self._batches],
                "busy_s": self.busy_s,
                **self.counts,
            }

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.settings.warmup:
            self._batches[self.settings.policy].warm(self.loaded.params, self.sizes, self._usual_layout())
        self._thread.start()

    def _usual_layout(self) -> ModelConfig:
        """The layout of a one-question prompt (a chat template places the image after its own prefix)."""
        blank = Image.new("RGB", self.image_shape[:2])
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

    def _busy_slots(self) -> int:
        return sum(o is not None for occupants in self._occupants.values() for o in occupants)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._busy_slots() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._waiting and not self._busy_slots():
                    return
                admissions = self._admit()
                batches = list(self._batches.items())
            for policy, model_cfg, bucket, group in admissions:
                self._guarded([g for _, g in group], functools.partial(self._prefill, policy, model_cfg, bucket, group))
            for policy, batch in batches:
                busy = [g for g in self._occupants[policy] if g is not None]
                if busy:
                    self._guarded(busy, functools.partial(self._advance, policy, batch))
            self._release_cancelled()

    def _admit(self) -> list[tuple[KVPolicy, ModelConfig, int, list[tuple[int, Generation]]]]:
        """Waiting requests into free slots, oldest first, grouped for prefill (under the lock)."""
        free = {p: [i for i, o in enumerate(occ) if o is None] for p, occ in self._occupants.items()}
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
            slot = free[generation.policy].pop(0)
            self._occupants[generation.policy][slot] = generation
            group.append((slot, generation))
            self._waiting.remove(generation)
        return admissions + [(*key, group) for key, group in groups.items() if group]

    def _prefill(self, policy, model_cfg, bucket, group: list[tuple[int, Generation]]) -> None:
        batch = self._batches[policy]
        size = next(s for s in self.sizes if s >= len(group))
        generations = [g for _, g in group]
        pad = size - len(group)
        prompts = Prompts(
            collate(generations, bucket, size, self.loaded.pad_id),
            np.array([slot for slot, _ in group] + [batch.num_slots] * pad, np.int32),
            np.array([g.temperature for g in generations] + [0.0] * pad, np.float32),
            np.array([g.top_p for g in generations] + [1.0] * pad, np.float32),
            np.array([g.seed for g in generations] + [0] * pad, np.uint32),
        )
        first = batch.insert(self.loaded.params, model_cfg, prompts)
        for (slot, generation), token in zip(group, first):
            self._accept(policy, slot, generation, int(token))

    def _advance(self, policy: KVPolicy, batch: SlotBatch) -> None:
        tokens = batch.step(self.loaded.params)
        for slot, generation in enumerate(self._occupants[policy]):
            if generation is not None:
                self._accept(policy, slot, generation, int(tokens[slot]))

    def _accept(self, policy: KVPolicy, slot: int, generation: Generation, token: int) -> None:
        """A new token of a request: its stream's next text, or its end."""
        generation.tokens.append(token)
        if token in self.loaded.stop_ids and not generation.ignore_eos:
            return self._finish(policy, slot, generation, "stop")
        if generation.stream or generation.stop:
            text, stopped = visible_answer(self.loaded.decode(generation.tokens), generation.stop, finished=False)
            if stopped:
                return self._finish(policy, slot, generation, "stop")
            if generation.stream and len(text) > generation.sent:
                generation.emit(Event(delta=text[generation.sent :]))
                generation.sent = len(text)
        if len(generation.tokens) >= generation.max_tokens:
            self._finish(policy, slot, generation, "length")

    def _finish(self, policy: KVPolicy, slot: int, generation: Generation, reason: str) -> None:
        answer = (
            generation.tokens[:-1]
            if reason == "stop" and generation.tokens[-1] in self.loaded.stop_ids
            else generation.tokens
        )
        text, _ = visible_answer(self.loaded.decode(answer), generation.stop, finished=True)
        self._occupants[policy][slot] = None
        self.counts["completed"] += 1
        generation.emit(Event(text[generation.sent :], reason, text, completion_tokens=len(generation.tokens)))

    def _release_cancelled(self) -> None:
        for occupants in self._occupants.values():
            for slot, generation in enumerate(occupants):
                if generation is not None and generation.cancelled.is_set():
                    occupants[slot] = None
                    self.counts["cancelled"] += 1

    def _guarded(self, generations: list[Generation], work: Callable[[], None]) -> None:
        """Runs device work; if it fails, its requests get the error and their slots back, and serving goes on."""
        start = time.perf_counter()
        try:
            work()
            self.busy_s += time.perf_counter() - start
        except Exception as err:  # one failed batch must not stop the server
            log.exception("device work failed")
            for generation in generations:
                for occupants in self._occupants.values():
                    for slot, occupant in enumerate(occupants):
                        if occupant is generation:
                            occupants[slot] = None
                generation.emit(Event(error=f"internal error: {type(err).__name__}: {err}"))


def describe(policy: KVPolicy) -> str:
    """A KV setting in a word: its policy and budget or ratio."""
    if policy.compression is not None:
        return f"{policy.name}@{policy.compression:g}"
    return policy.name if policy.budget is None else f"{policy.name}:{policy.budget}"
