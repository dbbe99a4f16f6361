"""The scheduler in process, against a fake engine (JetStream tests its
orchestrator so): admission order, cancel, stop strings, a full queue, mixed
KV settings and drain, with no model and no compilation."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from skipvision_jax.inference import LoadedModel
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.serving.scheduler import Event, Generation, QueueFull, Scheduler, ServeSettings, ShuttingDown
from tests.conftest import tiny_config

STOP = 2
FIRST_LETTER = 10  # token 10 is "a", 11 "b", ...
CFG = tiny_config()
IMAGE = np.zeros((CFG.vision.image_size, CFG.vision.image_size, 3), np.float32)
PREFIX_BYTES = 1024


def shade(pixels: np.ndarray) -> float:
    return float(pixels[0, 0, 0])


def letters(tokens) -> str:
    return "".join(chr(ord("a") + t - FIRST_LETTER) for t in tokens if t >= FIRST_LETTER)


def tokens_of(text: str) -> list[int]:
    return [FIRST_LETTER + ord(c) - ord("a") for c in text]


LOADED = LoadedModel(
    model_cfg=CFG,
    params={},
    mesh=None,
    rules=(),
    stop_ids=(STOP,),
    pad_id=0,
    decode=letters,
    encode=None,
    max_text_len=16,
)


@dataclasses.dataclass(frozen=True)
class FakePrefix:
    last_token: np.ndarray  # [P]: the first tokens
    rest: tuple[tuple[int, ...], ...]  # each prompt's later tokens


class FakeEngine:
    """Pure over its state (a tuple: each row's tokens still to come). A
    prompt answers with its own text ids, then STOP: the answer is the
    question's letters, whatever row or company it has."""

    def __init__(self, policy: KVPolicy, rows: int, log: list, gate: threading.Event, prefix_length: int | None):
        self.policy, self.rows, self.log, self.gate = policy, rows, log, gate
        self._prefix_length = prefix_length

    def init_state(self):
        return ((),) * self.rows

    def prefix_length(self, model_cfg) -> int | None:
        return self._prefix_length

    def prefixes(self, model_cfg, prefix_ids: np.ndarray, pixels: np.ndarray) -> list[dict]:
        """A prefix is its image's shade, in an entry of PREFIX_BYTES."""
        self.log.append(("prefixes", [shade(p) for p in pixels]))
        return [{"shade": np.full(PREFIX_BYTES // 4, shade(p), np.float32)} for p in pixels]

    def prefill(self, model_cfg, prompts, prefixes: list[dict] | None = None) -> FakePrefix:
        ids, mask = prompts.batch["input_ids"], prompts.batch["text_mask"]
        if prefixes is not None:  # each prompt extends its own image's prefix
            assert [p["shade"][0] for p in prefixes] == [shade(p) for p in prompts.batch["pixels"]]
        answers = [tuple(row[keep].tolist()) + (STOP,) for row, keep in zip(ids, mask)]
        return FakePrefix(np.array([a[0] for a in answers]), tuple(a[1:] for a in answers))

    def insert(self, prefix: FakePrefix, state, rows: np.ndarray):
        state, written = list(state), []
        for row, first, rest in zip(rows.tolist(), prefix.last_token.tolist(), prefix.rest):
            if row < self.rows:  # padding prompts go to row `rows`: written nowhere
                state[row] = rest
                written.append((row, letters((first, *rest))))
        self.log.append((self.policy.name, written))
        return tuple(state)

    def generate(self, state):
        assert self.gate.wait(10), "the gate never opened"
        tokens = np.array([pending[0] if pending else 0 for pending in state])
        return tuple(pending[1:] for pending in state), tokens

    def warm(self, sizes, model_cfg):
        pass


class Harness:
    def __init__(self, prefix_length: int | None = None, **settings):
        self.log, self.made = [], []
        self.gate = threading.Event()  # decode steps wait for it
        self.gate.set()
        settings = ServeSettings(**{"policy": KVPolicy.of("full"), "warmup": False, **settings})

        def engines(policy: KVPolicy) -> FakeEngine:
            self.made.append(str(policy))
            return FakeEngine(policy, settings.max_batch, self.log, self.gate, prefix_length)

        self.scheduler = Scheduler(LOADED, settings, engines)

    def request(self, question: str, policy: KVPolicy | None = None, **fields) -> Request:
        request = Request()
        generation = Generation(
            ids=np.array(tokens_of(question), np.int32),
            pixels=fields.pop("pixels", IMAGE),
            model_cfg=CFG,
            policy=policy or self.scheduler.default_policy,
            max_tokens=fields.pop("max_tokens", 16),
            temperature=0.0,
            top_p=1.0,
            seed=0,
            stop=fields.pop("stop", ()),
            stream=fields.pop("stream", False),
            emit=request.emit,
        )
        request.generation = generation
        return request

    def submit(self, *requests: Request) -> None:
        for request in requests:
            self.scheduler.submit(request.generation)


class Request:
    def __init__(self):
        self.events: list[Event] = []
        self.done = threading.Event()
        self.generation: Generation | None = None
        self.cancel_on_first_delta = False

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self.cancel_on_first_delta and event.delta:
            self.generation.cancelled.set()
        if event.finish_reason is not None or event.error is not None:
            self.done.set()

    def result(self, timeout: float = 10.0) -> Event:
        assert self.done.wait(timeout), "no answer"
        return self.events[-1]


def test_requests_are_admitted_oldest_first_into_free_rows_and_answer_alone():
    h = Harness(max_batch=2, max_prefill=2)
    requests = [h.request(q) for q in ("ab", "cd", "efg", "h", "ij")]
    h.submit(*requests)  # all waiting before the thread starts
    h.scheduler.start()
    assert [r.result().text for r in requests] == ["ab", "cd", "efg", "h", "ij"]
    h.scheduler.stop()
    # Two rows: the two oldest first, prefilled together; then the next two as both rows free at once;
    # then the last into the row that frees first.
    assert [inserted for _, inserted in h.log] == [[(0, "ab"), (1, "cd")], [(0, "efg"), (1, "h")], [(1, "ij")]]
    assert all(r.result().finish_reason == "stop" for r in requests)
    assert h.scheduler.stats()["completed"] == 5


def test_a_cancelled_request_is_never_prefilled_or_frees_its_row_at_once():
    h = Harness(max_batch=1, max_prefill=1)
    running, waiting, after = h.request("abcdefgh", stream=True), h.request("xy"), h.request("z")
    running.cancel_on_first_delta = True  # its client goes away mid-answer
    h.submit(running, waiting, after)
    waiting.generation.cancelled.set()  # gone before it was admitted
    h.scheduler.start()
    assert after.result().text == "z"
    h.scheduler.stop()
    assert [inserted for _, inserted in h.log] == [[(0, "abcdefgh")], [(0, "z")]]
    assert not running.done.is_set() and len(running.events) == 1  # nothing after it went away
    assert h.scheduler.stats()["cancelled"] == 2


def test_a_stop_string_ends_the_answer_before_it_and_streams_nothing_of_it():
    h = Harness()
    request = h.request("abcdef", stop=("cd",), stream=True)
    h.submit(request)
    h.scheduler.start()
    final = request.result()
    h.scheduler.stop()
    assert (final.text, final.finish_reason) == ("ab", "stop")
    assert "".join(e.delta for e in request.events) == "ab"
    assert all("c" not in e.delta for e in request.events)


def test_a_full_queue_refuses_and_counts():
    h = Harness(max_queue=2)
    h.submit(h.request("a"), h.request("b"))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        h.submit(h.request("c"))
    assert h.scheduler.stats()["refused_queue_full"] == 1


def test_each_kv_setting_decodes_in_its_own_engine_made_on_the_scheduler_thread():
    h = Harness(max_kv_settings=2)
    snap = KVPolicy.of("snapkv", compression=0.5)
    h.scheduler.admit(snap)
    assert h.made == []  # admitting a setting compiles nothing
    with pytest.raises(ValueError, match="limit of 2 KV settings"):
        h.scheduler.admit(KVPolicy.of("knorm", compression=0.5))
    with pytest.raises(ValueError, match="kv.budget"):
        Harness().scheduler.admit(KVPolicy.of("full", budget=3))  # smaller than a bucket's prompt
    plain, pressed = h.request("abc"), h.request("de", policy=snap)
    h.submit(plain, pressed)
    h.scheduler.start()
    assert (plain.result().text, pressed.result().text) == ("abc", "de")
    h.scheduler.stop()
    assert sorted(h.made) == ["full", "snapkv@0.5"]
    assert sorted(h.log) == [("full", [(0, "abc")]), ("snapkv", [(0, "de")])]


def test_stop_drains_every_accepted_request_then_refuses_new_ones():
    h = Harness(max_batch=2)
    h.gate.clear()  # the first decode step waits: stop comes while requests are mid-answer
    requests = [h.request(q, max_tokens=3) for q in ("abcdef", "gh", "ijklm", "n")]
    h.submit(*requests)
    h.scheduler.start()
    stopper = threading.Thread(target=h.scheduler.stop)
    stopper.start()
    while h.scheduler.stats()["status"] != "stopping":
        time.sleep(0.01)
    with pytest.raises(ShuttingDown):
        h.submit(h.request("o"))
    assert not any(r.done.is_set() for r in requests)
    h.gate.set()
    stopper.join(10)  # stop returns once the accepted ones are answered
    assert [(r.done.is_set(), r.events[-1].text) for r in requests] == [
        (True, "abc"),
        (True, "gh"),
        (True, "ijk"),
        (True, "n"),
    ]
    assert [r.events[-1].finish_reason for r in requests] == ["length", "stop", "length", "stop"]


def test_requests_with_one_image_share_its_prefix_cached_least_recently_used_first_out():
    # Room for two prefixes; the first two letters of a prompt are its text before the image.
    h = Harness(prefix_length=2, max_batch=4, max_prefill=4, prefix_cache_mb=2 * PREFIX_BYTES / 2**20)
    image = lambda value: np.full_like(IMAGE, value)
    first = [h.request(q, pixels=image(v)) for q, v in [("abx", 1), ("aby", 1), ("abz", 2), ("abw", 1)]]
    h.submit(*first)
    h.scheduler.start()
    assert [r.result().text for r in first] == ["abx", "aby", "abz", "abw"]
    # One batch, one forward per distinct image: the second, third and fourth request of image 1 join its.
    assert h.log[0] == ("prefixes", [1.0, 2.0])
    stats = h.scheduler.stats()
    assert (stats["prefix_hits"], stats["prefix_misses"], stats["prefix_entries"]) == (2, 2, 2)
    for value, question in [(3, "abq"), (1, "abr"), (1, "cdr")]:  # 3 evicts 1, the least recently used
        request = h.request(question, pixels=image(value))
        h.submit(request)
        assert request.result().text == question
    h.scheduler.stop()
    assert [entry for entry in h.log if entry[0] == "prefixes"] == [
        ("prefixes", [1.0, 2.0]),
        ("prefixes", [3.0]),
        ("prefixes", [1.0]),  # evicted, so computed again
        ("prefixes", [1.0]),  # another text before the image: another prefix
    ]
    stats = h.scheduler.stats()
    assert stats["prefix_evictions"] == 3 and stats["prefix_bytes"] == 2 * PREFIX_BYTES
    assert (stats["prefix_hits"], stats["prefix_misses"]) == (2, 5)


def test_prompts_that_end_in_their_prefix_or_a_cache_of_0_share_nothing():
    for prefix_length, mb, question in [(2, 1, "ab"), (2, 0, "abc"), (None, 1, "abc")]:
        h = Harness(prefix_length=prefix_length, prefix_cache_mb=mb)
        request = h.request(question)
        h.submit(request)
        h.scheduler.start()
        assert request.result().text == question
        h.scheduler.stop()
        assert not [entry for entry in h.log if entry[0] == "prefixes"]
        assert h.scheduler.stats().get("prefix_misses", 0) == 0
