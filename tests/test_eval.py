"""eval.py: LLaVA-format evaluation, against infer.py's one-at-a-time answers,
train.py's validation score, transformers' generate, and its own bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from skipvision_jax.batching import length_buckets
from skipvision_jax.data.synthetic import SyntheticVQA, as_typed
from skipvision_jax.data.tasks import export_llava_eval
from skipvision_jax.generate import Generator, Sampling
from skipvision_jax.inference import answer_text, load_trained
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.presses import POLICIES
from skipvision_jax.vqa import files
from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions
from tests.helpers import REPO, VAL_SIZE, read_metrics


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_llava_eval(str(tmp_path_factory.mktemp("export")), "val", VAL_SIZE)


def run_eval(*args, timeout=300):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "eval.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def eval_args(workdir, exported, answers, *extra):
    return [
        f"--checkpoint={workdir}",
        f"--question-file={exported['questions']}",
        f"--image-folder={exported['images']}",
        f"--answers-file={answers}",
        *extra,
    ]


def test_export_is_the_validation_split(exported):
    source = SyntheticVQA("val", VAL_SIZE)
    questions = files.read_questions(exported["questions"])
    assert [q.question_id for q in questions] == list(range(VAL_SIZE))
    for q in questions[:4]:
        _, kind, question, _, _ = source.sample(q.question_id)
        assert q.text == as_typed(question) and q.category == kind and q.text[0].isupper() and q.text.endswith("?")
        # The PNG holds exactly the pixels the model was validated on.
        from skipvision_jax.data.images import load_image, preprocess

        pixels = preprocess(load_image(os.path.join(exported["images"], q.image)), 32)
        np.testing.assert_allclose(pixels, source[q.question_id]["pixels"], atol=1e-6)


def test_eval_answers_as_infer_one_at_a_time_and_scores_as_train(workdir, exported, tmp_path):
    answers_path = str(tmp_path / "answers.jsonl")
    proc = run_eval(
        *eval_args(workdir, exported, answers_path, f"--annotation-file={exported['annotations']}", "--batch-size=8")
    )
    assert proc.returncode == 0, proc.stderr
    answers = {a["question_id"]: a for a in files.read_answers(answers_path)}
    assert sorted(answers) == list(range(VAL_SIZE))
    line = answers[0]
    assert (
        set(line) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        and line["model_id"] == "run"
    )
    assert line["metadata"]["policy"] == "full" and line["metadata"]["batch_size"] == 8

    # Batched, padded to buckets == one question at a time, unpadded, batch of 1 (infer.py's path).
    loaded = load_trained(workdir)
    generators = {}
    for q in files.read_questions(exported["questions"]):
        batch, model_cfg = loaded.make_batch(os.path.join(exported["images"], q.image), q.text)
        length = batch["input_ids"].shape[1]
        if length not in generators:
            generators[length] = Generator(
                model_cfg, KVPolicy.of("full"), 16, Sampling(), loaded.stop_ids, loaded.pad_id
            )
        state = generators[length](loaded.params, batch)
        assert answer_text(loaded, np.asarray(state.tokens[0])[: int(state.step)]) == answers[q.question_id]["text"], q
    # ... and infer.py itself, as a person runs it.
    for q in files.read_questions(exported["questions"])[:2]:
        infer = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "infer.py"),
                f"--checkpoint={workdir}",
                f"--image={os.path.join(exported['images'], q.image)}",
                f"--prompt={q.text}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert infer.returncode == 0, infer.stderr
        assert infer.stdout.strip() == answers[q.question_id]["text"]

    # Exact match == train.py's teacher-forced val_exact_match (every answer token and <eos> right).
    scores = json.loads((tmp_path / "answers.scores.json").read_text())
    final = read_metrics(workdir)[-1]
    assert 0 < final["val_exact_match"] < 1  # a model that is right on some and wrong on others
    assert scores["benchmark"] == "exact" and scores["count"] == VAL_SIZE
    assert scores["accuracy"] == pytest.approx(final["val_exact_match"])
    for kind, row in scores["by_category"].items():
        assert row["accuracy"] == pytest.approx(final[f"val_exact_match_{kind}"]), kind
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == scores


def test_every_policy_writes_its_file_and_the_table(workdir, exported, tmp_path):
    answers_path = str(tmp_path / "a.jsonl")
    proc = run_eval(
        *eval_args(
            workdir,
            exported,
            answers_path,
            f"--annotation-file={exported['annotations']}",
            "--kv-policy=all",
            "--batch-size=16",
            "--max-new-tokens=3",
            "--sink-tokens=1",
            "--recent-window=4",
            "--obs-window=2",
        )
    )
    assert proc.returncode == 0, proc.stderr
    table = {row["policy"]: row for row in json.loads((tmp_path / "a.policies.json").read_text())}
    assert list(table) == list(POLICIES)
    assert table["full"]["agreement_with_full"] == 1.0 and table["skip_vision"]["kv_slots"] < table["full"]["kv_slots"]
    for name in table:
        lines = files.read_answers(str(tmp_path / f"a.{name}.jsonl"))
        assert len(lines) == VAL_SIZE and {a["metadata"]["policy"] for a in lines} == {name}
        scores = json.loads((tmp_path / f"a.{name}.scores.json").read_text())
        assert table[name]["accuracy"] == scores["accuracy"]
    # Agreement is computed, not assumed: it is the share of identical answer texts.
    full = {a["question_id"]: a["text"] for a in files.read_answers(str(tmp_path / "a.full.jsonl"))}
    streaming = files.read_answers(str(tmp_path / "a.streaming.jsonl"))
    assert table["streaming"]["agreement_with_full"] == pytest.approx(
        np.mean([full[a["question_id"]] == a["text"] for a in streaming])
    )


def test_compilations_are_bounded_by_the_length_buckets(workdir, exported, tmp_path, compile_counter):
    """Prompts of many lengths in two buckets: one prefill and one decode
    program per bucket, whether the file holds 8 or 32 questions."""
    loaded = load_trained(workdir)
    assert length_buckets(loaded.max_text_len) == (8, 15)
    questions = files.read_questions(exported["questions"])
    lengths = {
        len(loaded.make_batch(os.path.join(exported["images"], q.image), q.text)[0]["input_ids"][0]) for q in questions
    }
    assert len(lengths) >= 4 and min(lengths) <= 8 < max(lengths)  # both buckets, several lengths in each
    settings = EvalSettings(KVPolicy.of("skip_vision"), max_new_tokens=4, batch_size=4, progress=False)
    counts = []
    for size in (8, 32):
        before = compile_counter.count
        summary = evaluate_questions(
            loaded, questions[:size], exported["images"], str(tmp_path / f"{size}.jsonl"), settings
        )
        assert summary["answered"] == size
        counts.append(compile_counter.count - before)
    # One prefill and one decode program per bucket used, plus at most two
    # one-time programs of the process (the rng key); 4x the questions, no more.
    buckets_used = 2
    assert counts[0] <= 2 * buckets_used + 2 and counts[1] <= min(counts[0], 2 * buckets_used), counts


def test_killed_mid_file_the_rerun_answers_every_question_exactly_once(workdir, tmp_path):
    exported = export_llava_eval(str(tmp_path / "export"), "val", 400)
    answers_path = tmp_path / "answers.jsonl"
    args = eval_args(workdir, exported, str(answers_path), "--batch-size=1", "--max-new-tokens=2")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "eval.py"), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if answers_path.exists() and answers_path.read_text().count("\n") >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_with = answers_path.read_text().count("\n")
    assert 5 <= killed_with < 400, f"the kill did not land mid-file ({killed_with} lines)"
    resumed = run_eval(*args)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(next(line for line in resumed.stdout.splitlines() if line.startswith("{")))
    assert summary["resumed"] >= 5 and summary["resumed"] + summary["answered"] == 400
    ids = [a["question_id"] for a in files.read_answers(str(answers_path))]
    assert sorted(ids) == list(range(400))


def test_a_line_cut_short_by_a_kill_is_dropped_and_answered_again(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "prompt": "Q?", "text": "red"}\n{"question_id": 2, "te')
    assert files.answered_keys(str(path)) == {(1, "Q?")}
    assert path.read_text() == '{"question_id": 1, "prompt": "Q?", "text": "red"}\n'
    path.write_text('{"question_id": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not an answer line"):
        files.answered_keys(str(path))


def test_chunks_split_as_llava_and_concatenate():
    items = list(range(10))
    chunks = [files.chunk(items, 3, i) for i in range(3)]
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # ceil(10 / 3) = 4 a chunk, as LLaVA's get_chunk
    assert files.chunk(items, 4, 3) == [9] and files.chunk(items, 1, 0) == items
    with pytest.raises(ValueError, match="--chunk-idx: 3 is outside"):
        files.chunk(items, 3, 3)


# ---- bad input: a one-line error before any work, or a counted, reported skip


def write_lines(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"question_id": 0, "image": "a.png", "text": "Q?"}, "{not json"], "line 2 is not valid JSON"),
        ([{"image": "a.png", "text": "Q?"}], "line 1 has no 'question_id'"),
        ([{"question_id": 0, "text": "Q?"}], "line 1 has no 'image'"),
        ([{"question_id": 0, "image": "a.png"}], "line 1 has no 'text'"),
        (
            [{"question_id": 0, "image": "a.png", "text": "Q?"}, {"question_id": 0, "image": "b.png", "text": "Q?"}],
            "line 2 repeats question_id 0 with the same text (first on line 1)",
        ),
        ([], "holds no question"),
    ],
)
def test_malformed_question_files_are_refused(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        files.read_questions(write_lines(tmp_path / "q.jsonl", lines))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--chunk-idx=2", "--num-chunks=2"], "--chunk-idx: 2 is outside [0, 2)"),
        (["--annotation-file=SHORT"], "lacks 1 of the questions (first: 31)"),
        (["--kv-policy=lru"], "--kv-policy: unknown 'lru'"),
        (["--kv-policy=h2o"], "kv.budget: the h2o policy needs a budget"),
        (["--question-file=EMPTY"], "holds no question"),
        (["--batch-size=0"], "--batch-size: must be >= 1"),
        (["--benchmark=gqa"], "--benchmark: needs --annotation-file"),
        (["--annotation-file=GT", "--benchmark=mmbench"], "--benchmark: unknown 'mmbench'"),
        (["--annotation-file=GT", "--benchmark=vqav2", "--convention=llava"], "--convention: vqav2 is scored under"),
        (["--annotation-file=GT", "--benchmark=pope"], "line 1: 'answer' must be yes or no, got"),
    ],
)
def test_bad_arguments_are_one_line_errors(workdir, exported, tmp_path, extra, message):
    short = write_lines(tmp_path / "short.jsonl", [{"question_id": i, "answer": "red"} for i in range(VAL_SIZE - 1)])
    empty = write_lines(tmp_path / "empty.jsonl", [])
    extra = [
        arg.replace("SHORT", short).replace("EMPTY", empty).replace("GT", exported["annotations"]) for arg in extra
    ]
    answers = tmp_path / "answers.jsonl"
    proc = run_eval(*eval_args(workdir, exported, str(answers)), *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        proc.stderr
    )
    assert not answers.exists() or answers.read_text() == ""


def test_missing_and_corrupt_images_are_answered_as_errors_and_counted(workdir, exported, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
    good = files.read_questions(exported["questions"])[0]
    os.symlink(os.path.join(exported["images"], good.image), tmp_path / "good.png")
    questions = write_lines(
        tmp_path / "q.jsonl",
        [
            {"question_id": "good", "image": "good.png", "text": good.text},
            {"question_id": "missing", "image": "missing.png", "text": good.text},
            {"question_id": "corrupt", "image": "corrupt.png", "text": good.text},
            {"question_id": "unknown word", "image": "good.png", "text": "What colour is it?"},
        ],
    )
    answers = tmp_path / "answers.jsonl"
    proc = run_eval(
        f"--checkpoint={workdir}",
        f"--question-file={questions}",
        f"--image-folder={tmp_path}",
        f"--answers-file={answers}",
        "--max-new-tokens=3",
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 questions could not be answered" in proc.stdout
    lines = {a["question_id"]: a for a in files.read_answers(str(answers))}
    assert "error" not in lines["good"]
    assert "image not found" in lines["missing"]["error"] and "cannot decode image" in lines["corrupt"]["error"]
    assert "word 'colour' is not in the vocabulary" in lines["unknown word"]["error"]


def test_mme_questions_sharing_an_image_id_are_answered_scored_and_resumed(workdir, exported, tmp_path):
    """MME's files give an image's two questions the image's id: eval.py keys
    questions by (question_id, text), scores the pairs (acc and acc+), and a
    rerun answers nothing twice. An annotation image without two questions is
    a one-line error before anything is written."""
    first, second = files.read_questions(exported["questions"])[:2]
    texts = ("how many objects are there ?", "which is further left , the red ring or the blue square ?")
    questions = write_lines(
        tmp_path / "q.jsonl",
        [{"question_id": q.image, "image": q.image, "text": t} for q in (first, second) for t in texts],
    )
    truth = [
        {"question_id": q.image, "question": t, "answer": yes_no, "category": "count"}
        for q in (first, second)
        for t, yes_no in zip(texts, ("Yes", "No"))
    ]
    gt = write_lines(tmp_path / "gt.jsonl", truth)
    answers = tmp_path / "answers.jsonl"
    args = eval_args(workdir, exported, str(answers), f"--annotation-file={gt}", "--benchmark=mme")
    args[1] = f"--question-file={questions}"
    proc = run_eval(*args)
    assert proc.returncode == 0, proc.stderr
    lines = files.read_answers(str(answers))
    assert sorted((a["question_id"], a["prompt"]) for a in lines) == sorted(
        (q.image, t) for q in (first, second) for t in texts
    )
    assert len({a["answer_id"] for a in lines}) == 4
    scores = json.loads((tmp_path / "answers.scores.json").read_text())
    assert scores["benchmark"] == "mme" and scores["by_category"]["count"]["count"] == 4
    assert scores["perception"] == scores["by_category"]["count"]["score"]
    rerun = run_eval(*args)
    summary = json.loads(next(line for line in rerun.stdout.splitlines() if line.startswith('{"policy"')))
    assert (summary["resumed"], summary["answered"]) == (4, 0)
    write_lines(tmp_path / "gt.jsonl", truth[:3])
    answers.unlink()
    bad = run_eval(*args)
    assert bad.returncode != 0 and f"MME image {second.image!r} has 1 questions" in bad.stderr
    assert not answers.exists()
