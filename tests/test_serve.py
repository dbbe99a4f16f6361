"""serve.py through the official `openai` client on loopback: greedy answers
equal eval.py's (an embedded-task checkpoint, a tiny HF LLaVA), one at a time
and 32 at once, streamed and not; no compilation after warm-up; every bad
request a 4xx with OpenAI's error JSON while serving goes on; a client gone
frees its slot; SIGTERM answers the requests in flight and exits 0."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from skipvision_jax.data.llava import Turn
from skipvision_jax.data.tasks import export_llava_eval
from skipvision_jax.inference import load_hf, load_trained
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.serving.api import ApiError, ChatRequest, conversation, request_policy
from skipvision_jax.serving.scheduler import visible_answer
from skipvision_jax.vqa import files
from skipvision_jax.vqa.benchmarks import read_annotations, score
from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions
from tests.helpers import REPO, VAL_SIZE, free_port
from tests.hf_tiny import make_hf_llava, write_image

MAX_NEW = 16
PREFIX_CACHE_MB = 0.02


# ---- pure parts ----------------------------------------------------------------------------


def test_stop_strings_cut_the_answer_and_hold_back_what_may_become_one():
    assert visible_answer("red and blue", ("and",), finished=False) == ("red ", True)
    assert visible_answer("red an", ("and",), finished=False) == ("red ", False)  # "an" may become "and"
    assert visible_answer("red an", ("and",), finished=True) == ("red an", False)
    assert visible_answer("red \ufffd", (), finished=False) == ("red ", False)  # half a character
    assert visible_answer("a.b.c", ("b", "."), finished=True) == ("a", True)  # the first stop string to occur


def _messages(*turns, image="data:image/png;base64,iVBORw0KGgo="):
    out = []
    for i, (role, text) in enumerate(turns):
        content = [{"type": "text", "text": text}]
        if i == [r for r, _ in turns].index("user"):
            content = [{"type": "image_url", "image_url": {"url": image}}, *content]
        out.append({"role": role, "content": content})
    return ChatRequest.model_validate({"messages": out}).messages


def test_a_conversation_is_a_system_turn_then_alternating_turns_with_one_image():
    image, turns = conversation(
        _messages(("system", "be brief"), ("user", "what?"), ("assistant", "red"), ("user", "and?"))
    )
    assert image.startswith(b"\x89PNG")
    assert turns == [Turn("system", "be brief"), Turn("user", "what?"), Turn("assistant", "red"), Turn("user", "and?")]
    for bad in [
        _messages(("user", "a"), ("user", "b")),
        _messages(("user", "a"), ("assistant", "b")),
        _messages(("assistant", "a"), ("user", "b")),
        _messages(("user", "a"), image="https://example.com/cat.png"),
        _messages(("user", "a"), image="data:image/png;base64,@@@"),
        _messages(("user", "a"), image="data:image/png,rawbytes"),
        ChatRequest.model_validate({"messages": [{"role": "user", "content": "no image"}]}).messages,
    ]:
        with pytest.raises(ApiError) as err:
            conversation(bad)
        assert err.value.status == 400


def test_a_request_changes_the_servers_kv_setting_field_by_field():
    server = KVPolicy.of("h2o", budget=64, recent_window=8)
    change = lambda **fields: request_policy(
        server, ChatRequest.model_validate({"messages": [{"role": "user", "content": "?"}], **fields})
    )
    assert change() is server
    assert change(kv_policy="streaming") == KVPolicy.of("streaming", budget=64)  # streaming has no recent window
    assert change(kv_compression=0.5) == KVPolicy.of("h2o", compression=0.5, recent_window=8)
    assert change(kv_policy="full") == KVPolicy.of("full")
    with pytest.raises(ApiError, match="unknown 'nope'"):
        change(kv_policy="nope")


# ---- a served model ------------------------------------------------------------------------


class Server:
    """serve.py in a subprocess on a free loopback port."""

    def __init__(self, *args: str, ready_s: float = 600):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "serve.py"), "--host=127.0.0.1", f"--port={self.port}", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited {self.proc.returncode}: {self.proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            self.close()
            raise RuntimeError("serve.py did not come up")
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def post(self, body, **kwargs) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        kwargs.setdefault("timeout", 120)
        return httpx.post(f"{self.url}/v1/chat/completions", content=content, headers=headers, **kwargs)

    def ask(self, image_path: str, question: str, **kwargs) -> openai.types.chat.ChatCompletion:
        return self.client.chat.completions.create(
            model=kwargs.pop("model", None) or self.model_id(),
            messages=user_message(image_path, question),
            max_tokens=kwargs.pop("max_tokens", MAX_NEW),
            temperature=kwargs.pop("temperature", 0),
            **kwargs,
        )

    def model_id(self) -> str:
        return self.client.models.list().data[0].id

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def data_url(image_path: str) -> str:
    kind = "jpeg" if image_path.endswith(".jpg") else "png"
    with open(image_path, "rb") as f:
        return f"data:image/{kind};base64," + base64.b64encode(f.read()).decode()


def user_message(image_path: str, question: str) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": data_url(image_path)}}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def eval_answers(loaded, questions, image_folder, path, policy: KVPolicy | None = None) -> dict:
    """eval.py's answers (its harness, in this process), each prompt prefilled whole."""
    settings = EvalSettings(policy or KVPolicy.of("full"), MAX_NEW, batch_size=8, progress=False, share_prefix=False)
    evaluate_questions(loaded, questions, image_folder, path, settings)
    return {a["question_id"]: a["text"] for a in files.read_answers(path)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_llava_eval(str(tmp_path_factory.mktemp("export")), "val", VAL_SIZE)


def serving(*args: str):
    """A module fixture's server, stopped (if still up) after the module."""
    server = Server(*args)
    yield server
    server.close()


@pytest.fixture(scope="module")
def embedded(trained_workdir):
    # Warmed at start-up: every program this test runs is compiled before it listens.
    yield from serving(
        f"--checkpoint={trained_workdir}",
        "--max-batch=32",
        "--max-prefill=4",
        f"--max-new-tokens={MAX_NEW}",
        "--max-body-mb=1",
        # Room for three of this model's prefixes (13 rows, 2 layers: 6.5 KB each), so requests evict.
        f"--prefix-cache-mb={PREFIX_CACHE_MB}",
    )


def test_embedded_answers_equal_eval_one_at_a_time_32_at_once_and_streamed(
    embedded, trained_workdir, exported, tmp_path
):
    questions = files.read_questions(exported["questions"])
    expected = eval_answers(load_trained(trained_workdir), questions, exported["images"], str(tmp_path / "a.jsonl"))
    compiled = embedded.health()["compilations"]
    image = lambda q: os.path.join(exported["images"], q.image)

    alone = {q.question_id: embedded.ask(image(q), q.text).choices[0].message.content for q in questions}
    assert alone == expected
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = dict(
            zip(
                [q.question_id for q in questions],
                pool.map(lambda q: embedded.ask(image(q), q.text).choices[0].message.content, questions),
            )
        )
    assert together == expected
    for q in questions[:4]:
        stream = embedded.ask(image(q), q.text, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected[q.question_id]
        assert chunks[-1].usage.completion_tokens >= 1 and chunks[-2].choices[0].finish_reason == "stop"
    # 64 answers later, compiled as much as right after start-up: nothing per request.
    stats = embedded.health()
    assert stats["compilations"] == compiled and stats["slots_busy"] == 0
    assert stats["completed"] >= 2 * VAL_SIZE + 4


def test_questions_on_one_image_share_its_prefix_with_eval_answers_in_a_cache_under_its_limit(
    embedded, trained_workdir, exported, tmp_path
):
    questions = files.read_questions(exported["questions"])
    on_one = [dataclasses.replace(q, image=questions[0].image) for q in questions[:8]]
    expected = eval_answers(load_trained(trained_workdir), on_one, exported["images"], str(tmp_path / "a.jsonl"))
    image = lambda q: os.path.join(exported["images"], q.image)
    before = embedded.health()
    for q in questions[8:12]:  # four images through a cache with room for three
        embedded.ask(image(q), q.text)
    filled = embedded.health()
    alone = {q.question_id: embedded.ask(image(q), q.text).choices[0].message.content for q in on_one}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda q: embedded.ask(image(q), q.text).choices[0].message.content, on_one)
        together = dict(zip([q.question_id for q in on_one], answers))
    after = embedded.health()
    assert alone == expected and together == expected
    # 16 requests on one image: its prefix computed once at most, every other request a hit.
    hits, misses = (after[k] - filled[k] for k in ("prefix_hits", "prefix_misses"))
    assert hits + misses == 16 and misses <= 1
    assert filled["prefix_evictions"] > before["prefix_evictions"]
    assert 1 <= after["prefix_entries"] <= 3 and after["prefix_bytes"] <= after["prefix_limit_bytes"]
    assert after["prefix_limit_bytes"] == int(PREFIX_CACHE_MB * 2**20)
    assert after["compilations"] == before["compilations"]


def test_a_request_names_its_kv_setting_and_decodes_as_eval_under_it(embedded, trained_workdir, exported, tmp_path):
    questions = files.read_questions(exported["questions"])[:8]
    # h2o evicting at prefill and at every step: the buffer must be the budget, in every slot.
    policy = KVPolicy.of("h2o", budget=24)
    expected = eval_answers(
        load_trained(trained_workdir), questions, exported["images"], str(tmp_path / "a.jsonl"), policy
    )
    kv = {"kv_policy": "h2o", "kv_budget": 24}
    image = lambda q: os.path.join(exported["images"], q.image)
    answers = {
        q.question_id: embedded.ask(image(q), q.text, extra_body=kv).choices[0].message.content for q in questions
    }
    assert answers == expected
    assert embedded.health()["kv_settings"] == ["full", "h2o:24"]


def test_sampling_with_a_seed_repeats_and_usage_counts(embedded, exported):
    q = files.read_questions(exported["questions"])[0]
    image = os.path.join(exported["images"], q.image)
    draw = lambda seed: embedded.ask(image, q.text, temperature=1.5, seed=seed).choices[0].message.content
    first = draw(1)
    assert draw(1) == first
    assert any(draw(s) != first for s in range(2, 8))
    reply = embedded.ask(image, q.text)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == "stop" and reply.model == embedded.model_id()


def _bad_requests(image_path: str, question: str, model: str) -> list[tuple[str, object, int, str]]:
    good = {"model": model, "messages": user_message(image_path, question), "max_tokens": 4}
    with_message = lambda content: {**good, "messages": [{"role": "user", "content": content}]}
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    return [
        ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
        ("no messages", {"model": model}, 400, "messages"),
        ("no image", with_message(question), 400, "exactly one image"),
        ("an http URL", with_message([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]), 400, "data:"),
        ("an undecodable image", with_message([{"type": "image_url", "image_url": {"url": garbage}}]), 400, "decode"),
        ("a prompt too long", {**good, "messages": user_message(image_path, "red " * 400)}, 400, "exceed"),
        ("n > 1", {**good, "n": 2}, 400, "n:"),
        ("tools", {**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("logprobs", {**good, "logprobs": True}, 400, "logprobs"),
        # What would change the answer and is not built: refused, never ignored.
        ("response_format json", {**good, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ("logit_bias", {**good, "logit_bias": {"5": 100}}, 400, "logit_bias"),
        ("presence_penalty", {**good, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("frequency_penalty", {**good, "frequency_penalty": -1}, 400, "frequency_penalty"),
        # A known field of the wrong type or range (OpenAI's API refuses these too).
        ("presence_penalty a string", {**good, "presence_penalty": "xxx"}, 400, "presence_penalty"),
        ("presence_penalty an object", {**good, "presence_penalty": {}}, 400, "presence_penalty"),
        ("presence_penalty NaN", json.dumps({**good, "presence_penalty": float("nan")}).encode(), 400, ""),
        ("presence_penalty out of range", {**good, "presence_penalty": 3}, 400, "presence_penalty"),
        ("response_format a number", {**good, "response_format": 0.5}, 400, "response_format"),
        ("user a list", {**good, "user": [1, 2]}, 400, "user"),
        ("max_tokens a boolean", {**good, "max_tokens": True}, 400, "max_tokens"),
        ("temperature a string", {**good, "temperature": "0"}, 400, "temperature"),
        (
            "an image over the pixel limit",
            with_message([huge_image_part(), {"type": "text", "text": question}]),
            400,
            "pixels",
        ),
        ("an unknown KV policy", {**good, "kv_policy": "nope"}, 400, "unknown"),
        ("an impossible budget", {**good, "kv_policy": "full", "kv_budget": 3}, 400, "kv.budget"),
        ("an unknown model", {**good, "model": "gpt-5"}, 404, "does not exist"),
        ("a body over the limit", {**good, "pad": "x" * (2 * 2**20)}, 413, "limit"),
    ]


def huge_image_part() -> dict:
    """A PNG whose header says 12,000 x 12,000 (the pixels behind it are one):
    a server that decoded it before checking its size would allocate 432 MB."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # the signature, then the IHDR chunk's length and type
    png[ihdr : ihdr + 8] = struct.pack(">II", 12_000, 12_000)
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13])))
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def test_lmms_evals_default_request_is_answered(embedded, exported, tmp_path):
    """lmms-eval's openai_compatible model asks for 1,024 tokens when a task sets none, at temperature 0."""
    from PIL import Image

    q = files.read_questions(exported["questions"])[0]
    image = os.path.join(exported["images"], q.image)
    reply = embedded.ask(image, q.text, max_tokens=1024, temperature=0)
    assert reply.choices[0].message.content == embedded.ask(image, q.text).choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    jpeg = str(tmp_path / "image.jpg")
    Image.open(image).convert("RGB").save(jpeg, quality=95)
    assert embedded.ask(jpeg, q.text, max_tokens=1024).choices[0].finish_reason == "stop"


def test_lmms_eval_scores_the_served_model_as_eval_py(embedded, trained_workdir, exported, tmp_path):
    """lmms-eval's own command line (openai_compatible, 32 requests at once,
    1,024 tokens asked) on integrations/lmms_eval's task, against serve.py:
    the score it reports is eval.py's on the same checkpoint and questions."""
    expected_answers = str(tmp_path / "eval.jsonl")
    eval_answers(
        load_trained(trained_workdir), files.read_questions(exported["questions"]), exported["images"], expected_answers
    )
    expected = score("exact", files.read_answers(expected_answers), read_annotations(exported["annotations"], "exact"))
    assert 0 < expected["accuracy"] < 1  # some right, some wrong: a score that can disagree
    env = {**os.environ, "OPENAI_API_KEY": "unused", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,  # lmms-eval's command line, from this environment
            "-m",
            "lmms_eval",
            "--model=openai_compatible",
            f"--model_args=model_version={embedded.model_id()},base_url={embedded.url}/v1",
            "--tasks=skipvision_embedded",
            f"--include_path={os.path.join(REPO, 'integrations', 'lmms_eval')}",
            "--batch_size=1",
            f"--output_path={tmp_path / 'out'}",
        ],
        cwd=os.path.dirname(exported["lmms_eval"]),  # the task reads lmms_eval.jsonl where it runs
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "*results.json"), recursive=True)
    reported = json.load(open(results_file))["results"]["skipvision_embedded"]["exact_match,none"]
    assert reported == pytest.approx(expected["accuracy"])


def test_bad_requests_are_4xx_with_an_error_json_and_serving_goes_on(embedded, exported):
    q = files.read_questions(exported["questions"])[0]
    image = os.path.join(exported["images"], q.image)
    before = embedded.ask(image, q.text).choices[0].message.content
    for name, body, status, message in _bad_requests(image, q.text, embedded.model_id()):
        reply = embedded.post(body)
        assert reply.status_code == status, (name, reply.text)
        error = reply.json()["error"]
        assert message in error["message"] and set(error) == {"message", "type", "param", "code"}, (name, error)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):  # the official client raises OpenAI's exception
        embedded.ask(image, "What colour is it?")
    assert embedded.ask(image, q.text).choices[0].message.content == before
    assert embedded.health()["slots_busy"] == 0


# ---- a tiny Hugging Face LLaVA: slots few, answers long ------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    make_hf_llava(str(directory / "model"), "gqa")
    questions = ["what is in the picture ?", "red ?", "a blue square ring ?", "one two three"]
    lines = [{"question_id": f"q{i}", "image": f"{i % 2}.png", "text": text} for i, text in enumerate(questions)]
    for i in range(2):
        write_image(str(directory / f"{i}.png"), seed=i)
    (directory / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


LONG = 2000  # tokens (a second or more): the random model never says eos, so a request holds its slot this long


@pytest.fixture(scope="module")
def hf_server(hf_dir):
    # Two slots, two waiting: the rest are refused. Programs compile on first use here.
    yield from serving(
        f"--hf-checkpoint={hf_dir / 'model'}",
        "--max-batch=2",
        "--max-queue=2",
        f"--max-new-tokens={LONG}",
        "--nowarmup",
    )


def test_hf_answers_equal_eval(hf_server, hf_dir, tmp_path):
    questions = files.read_questions(str(hf_dir / "q.jsonl"))
    expected = eval_answers(load_hf(str(hf_dir / "model")), questions, str(hf_dir), str(tmp_path / "a.jsonl"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda q: hf_server.ask(str(hf_dir / q.image), q.text).choices[0].message.content, questions)
        )
    assert answers == [expected[q.question_id] for q in questions]
    assert all(answer for answer in answers)


def test_a_full_queue_is_503_with_retry_after(hf_server, hf_dir):
    # Over the server's limit: clamped to it, and cut there ("length").
    body = {"messages": user_message(str(hf_dir / "0.png"), "red ?"), "max_tokens": 2 * LONG, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: hf_server.post(body), range(8)))
    refused = [r for r in replies if r.status_code == 503]
    assert sorted({r.status_code for r in replies}) == [200, 503] and len(refused) >= 2
    assert all(r.headers["Retry-After"] == "1" and "waiting" in r.json()["error"]["message"] for r in refused)
    done = [r.json() for r in replies if r.status_code == 200]
    assert all(d["usage"]["completion_tokens"] == LONG and d["choices"][0]["finish_reason"] == "length" for d in done)


def _wait_for(predicate, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_goes_away_frees_its_slot(hf_server, hf_dir):
    body = {"messages": user_message(str(hf_dir / "0.png"), "red ?"), "max_tokens": LONG, "temperature": 0}
    before = hf_server.health()
    # A stream read for two chunks, then dropped.
    with httpx.stream(
        "POST", f"{hf_server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
    assert _wait_for(lambda: hf_server.health().get("cancelled", 0) == before.get("cancelled", 0) + 1)
    # A plain request whose client times out.
    with pytest.raises(httpx.ReadTimeout):
        hf_server.post(body, timeout=httpx.Timeout(60, read=0.3))
    assert _wait_for(lambda: hf_server.health().get("cancelled", 0) == before.get("cancelled", 0) + 2)
    stats = hf_server.health()
    assert stats["slots_busy"] == 0 and stats["completed"] == before["completed"]  # neither ran to its end


def test_sigterm_answers_the_requests_in_flight_and_exits_0(hf_server, hf_dir):
    body = {"messages": user_message(str(hf_dir / "0.png"), "red ?"), "max_tokens": LONG, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = [pool.submit(hf_server.post, body) for _ in range(2)]
        assert _wait_for(lambda: hf_server.health()["slots_busy"] == 2)
        hf_server.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        results = [r.result() for r in replies]
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == LONG for r in results)  # answered to the end
    assert hf_server.proc.wait(30) == 0 and time.monotonic() - start < 30
    with pytest.raises(httpx.TransportError):  # no longer listening
        hf_server.health()
