"""Per-benchmark scorers on hand-checked fixtures, each reference's quirks
included (skipvision_jax/vqa/benchmarks.py names the reference files)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from skipvision_jax.vqa import benchmarks
from skipvision_jax.vqa.benchmarks import evalai_answer, read_annotations, score
from tests.helpers import REPO


@pytest.mark.parametrize(
    "raw, processed",
    [
        ("1,000", "1000"),  # commas deleted before anything else
        ("10%", "10%"),  # no rule for %
        ("man's", "man 's"),  # "'s" split off
        ("Im", "im"),  # the table's "Im" is capitalized: never matches lower-cased text
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),  # one apostrophe missing is restored ...
        ("couldntve", "couldntve"),  # ... two are not
        ("somebody'd", "somebodyd"),  # the table maps this one the wrong way round
        ("Two dogs.", "2 dogs"),  # number words, the sentence's period
        ("3.5", "3.5"),  # a period before a digit stays
        ("the t-shirt", "t shirt"),  # articles go; a hyphen between letters becomes a space
        ("t - shirt", "t shirt"),  # a hyphen beside a space is deleted
        ("1,000 t-shirts", "1000 t shirts"),  # the comma left by word_tokenize is gone: hyphen to space
        ("a (b)", "b"),
        ("." * 40 + "x", "." * 8 + "x"),  # re.UNICODE passed as the count: 32 periods at most
    ],
)
def test_evalai_answer_processor(raw, processed):
    assert evalai_answer(raw) == processed


def write_lines(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def annotations_for(tmp_path, name, rows, convention=None):
    return read_annotations(write_lines(tmp_path / "gt.jsonl", rows), name, convention)


def answers(*texts, ids=None):
    return [{"question_id": qid, "text": text} for qid, text in zip(ids or range(len(texts)), texts)]


@pytest.mark.parametrize("convention", ["llava", "lmms-eval"])
def test_textvqa(tmp_path, convention):
    rows = [
        {"question_id": 0, "answers": ["1000"] * 3 + ["one thousand"] * 7},
        {"question_id": 1, "answers": ["Coca-Cola"] * 2 + ["pepsi"] * 8},
    ]
    gt = annotations_for(tmp_path, "textvqa", rows, convention)
    # "1,000" is "1000": 3 matching humans -> (3 * 2/3 + 7 * 1) / 10 = 0.9; "coca cola" matches 2 -> 0.6
    result = score("textvqa", answers("1,000", "coca cola"), gt, convention)
    assert result["accuracy"] == pytest.approx((0.9 + 0.6) / 2)
    assert result["count"] == 2 and result["convention"] == convention


def test_textvqa_llava_needs_ten_answers_lmms_eval_does_not(tmp_path):
    rows = [{"question_id": 0, "answers": ["a"] * 3}]
    with pytest.raises(ValueError, match="line 1: LLaVA's TextVQA scorer needs 10 human answers, found 3"):
        annotations_for(tmp_path, "textvqa", rows, "llava")
    gt = annotations_for(tmp_path, "textvqa", rows, "lmms-eval")
    assert score("textvqa", answers("a"), gt, "lmms-eval")["accuracy"] == pytest.approx(2 / 3)


def test_vqav2_processes_humans_and_prediction_alike(tmp_path):
    rows = [
        # lmms-eval 0.7.3 processes the human answers whether or not they agree
        # (the official VQA evaluation only when they disagree): "t-shirt" -> "t shirt".
        {"question_id": 0, "answers": ["t-shirt"] * 10},
        {"question_id": 1, "answers": [{"answer": "t-shirt"}] * 4 + ["shirt"] * 6},
    ]
    gt = annotations_for(tmp_path, "vqav2", rows)
    result = score("vqav2", answers("t-shirt", "T-shirt"), gt)
    assert result["convention"] == "lmms-eval"
    assert result["accuracy"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "convention, text, right",
    [
        ("llava", "Table.", True),  # rstrip('.') and lower()
        ("llava", "table!", False),
        ("llava", " table", False),
        ("lmms-eval", "table!", True),  # punctuation deleted, case ignored
        ("lmms-eval", "Table.", True),
        ("lmms-eval", " table", True),  # lmms-eval trims every answer before scoring
    ],
)
def test_gqa(tmp_path, convention, text, right):
    gt = annotations_for(tmp_path, "gqa", [{"question_id": "q", "answer": "table"}])
    assert score("gqa", answers(text, ids=["q"]), gt, convention)["accuracy"] == float(right)


POPE_ROWS = [
    {"question_id": 0, "answer": "no", "category": "adversarial"},
    {"question_id": 1, "answer": "yes", "category": "adversarial"},
    {"question_id": 2, "answer": "yes", "category": "random"},
    {"question_id": 3, "answer": "no", "category": "random"},
]


def test_pope_llava_reads_the_first_sentence(tmp_path):
    gt = annotations_for(tmp_path, "pope", POPE_ROWS)
    texts = ["No, there is not.", "Yes. But not clearly", "There is a dog.", "NO"]
    result = score("pope", answers(*texts), gt)
    # predictions: no (right), yes (the 'not' is after the first period: right),
    # yes (right), yes ("NO" is not 'No', 'no' or 'not': wrong)
    assert result["convention"] == "llava"
    assert result["accuracy"] == 0.75
    assert (result["precision"], result["recall"], result["f1"]) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    assert result["yes_ratio"] == 0.75  # of the predictions
    assert result["by_category"]["adversarial"]["accuracy"] == 1.0
    assert result["by_category"]["random"]["precision"] == 0.5


def test_pope_lmms_eval_is_strict(tmp_path):
    gt = annotations_for(tmp_path, "pope", POPE_ROWS)
    result = score("pope", answers("No, there is not.", " Yes ", "yes", "no"), gt, "lmms-eval")
    # "No, there is not." is neither yes nor no: wrong, and neither a TP/FP nor a FN
    assert result["accuracy"] == 0.75
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    assert result["yes_ratio"] == 0.5  # pope_aggregate_yes_ratio counts the ground truth's yeses
    no_yes = score("pope", answers("no", "no", "no", "no"), gt, "lmms-eval")
    assert (no_yes["precision"], no_yes["f1"]) == (0.0, 0.0)  # an empty denominator is 0
    assert score("pope", answers("no", "no", "no", "no"), gt, "llava")["precision"] is None  # eval_pope.py divides by 0


def test_mme_pairs_per_image(tmp_path):
    rows = [
        {"question_id": "a.jpg", "question": "Is it red?", "answer": "Yes", "category": "color"},
        {"question_id": "a.jpg", "question": "Is it blue?", "answer": "No", "category": "color"},
        {"question_id": "b.jpg", "question": "Is it red?", "answer": "No", "category": "color"},
        {"question_id": "b.jpg", "question": "Is it blue?", "answer": "Yes", "category": "color"},
        {"question_id": "c.jpg", "question": "2+2=4?", "answer": "Yes", "category": "numerical_calculation"},
        {"question_id": "c.jpg", "question": "2+2=5?", "answer": "No", "category": "numerical_calculation"},
    ]
    gt = annotations_for(tmp_path, "mme", rows)
    lines = [
        {"question_id": "a.jpg", "prompt": "Is it red?", "text": "Yes."},
        {"question_id": "a.jpg", "prompt": "Is it blue?", "text": "no"},  # a: both right
        {"question_id": "b.jpg", "prompt": "Is it red?", "text": "n"},
        {"question_id": "b.jpg", "prompt": "Is it blue?", "text": "Nope"},  # b: one of two
        {"question_id": "c.jpg", "prompt": "2+2=4?", "text": "yes, it is"},
        {"question_id": "c.jpg", "prompt": "2+2=5?", "text": "maybe"},  # c: one of two ("other")
    ]
    result = score("mme", lines, gt)
    color = result["by_category"]["color"]
    assert (color["acc"], color["acc_plus"], color["score"]) == (75.0, 50.0, 125.0)
    calc = result["by_category"]["numerical_calculation"]
    assert (calc["acc"], calc["acc_plus"]) == (50.0, 0.0)  # one of two right: acc 50, acc+ 0
    assert (result["perception"], result["cognition"]) == (125.0, 50.0)
    with pytest.raises(ValueError, match="MME image 'c.jpg' has 1 answered questions"):
        score("mme", lines[:5], gt)


@pytest.mark.parametrize(
    "text, llava, lmms_eval",
    [
        ("B", True, True),
        ("B.", False, True),  # LLaVA needs "B. " (a space after the period)
        ("B. Paris", True, True),
        ("The answer is B.", True, False),
        ("The answer is B", False, False),  # LLaVA's pattern needs a character after the letter
        ("The answer is B. The answer is B.", False, False),  # and exactly one match
        ("A", False, False),
        ("E", False, False),  # beyond the choices
        ("b", False, True),  # lmms-eval ignores case
        (" B ", False, True),  # and trims
    ],
)
def test_scienceqa_img(tmp_path, text, llava, lmms_eval):
    gt = annotations_for(tmp_path, "scienceqa_img", [{"question_id": 7, "answer": 1, "choices": ["x", "y", "z"]}])
    for convention, right in (("llava", llava), ("lmms-eval", lmms_eval)):
        assert score("scienceqa_img", answers(text, ids=[7]), gt, convention)["accuracy"] == float(right), convention


def test_exact_match_per_category_with_errors_scored_and_counted(tmp_path):
    gt = annotations_for(tmp_path, "exact", [{"question_id": i, "answer": a} for i, a in enumerate(["red", "2", "x"])])
    lines = answers("Red", "two", "") + []
    lines[2]["error"] = "image not found: x.png"
    result = score("exact", lines, gt, categories={0: "colour", 1: "count", 2: "count"})
    assert result["accuracy"] == pytest.approx(1 / 3) and result["errors"] == 1
    assert result["by_category"] == {"colour": {"count": 1, "accuracy": 1.0}, "count": {"count": 2, "accuracy": 0.0}}


@pytest.mark.parametrize(
    "name, convention, rows, message",
    [
        ("textvqa", None, [{"question_id": 1, "answer": "x"}], "line 1 lacks ['answers']"),
        ("pope", None, [{"question_id": 1, "answer": "yes"}], "line 1 lacks ['category']"),
        ("pope", None, [{"question_id": 1, "answer": "maybe", "category": "r"}], "'answer' must be yes or no"),
        ("mme", None, [{"question_id": 1, "answer": "Yes", "category": "color"}], "lacks ['question']"),
        ("scienceqa_img", None, [{"question_id": 1, "answer": 3, "choices": ["a", "b"]}], "index of a choice"),
        ("vqav2", None, [{"question_id": 1, "answers": [{"text": "x"}]}], "objects with an 'answer'"),
        (
            "mme",
            None,
            [{"question_id": "a.jpg", "question": "q?", "answer": "Yes", "category": "color"}],
            "MME image 'a.jpg' has 1 questions",
        ),
        ("mmbench", None, [], "--benchmark: unknown 'mmbench'"),
        ("vqav2", "llava", [], "--convention: vqav2 is scored under ['lmms-eval'], not 'llava'"),
        ("gqa", "vqa", [], "--convention: gqa is scored under"),
    ],
)
def test_bad_annotations_are_one_line_errors(tmp_path, name, convention, rows, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        annotations_for(tmp_path, name, rows, convention)


def test_answers_without_annotation_are_an_error(tmp_path):
    gt = annotations_for(tmp_path, "gqa", [{"question_id": 1, "answer": "x"}])
    with pytest.raises(ValueError, match="lacks 1 answered questions \\(first: 2\\)"):
        score("gqa", answers("x", ids=[2]), gt)


def run_score(*args):
    return subprocess.run(
        [sys.executable, "-m", "skipvision_jax.vqa.score", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_score_command_prints_and_writes_or_fails_in_one_line(tmp_path):
    gt = write_lines(tmp_path / "gt.jsonl", POPE_ROWS)
    answers_file = write_lines(tmp_path / "a.jsonl", answers("no", "yes", "yes", "yes"))
    proc = run_score("--benchmark=pope", f"--answers-file={answers_file}", f"--annotation-file={gt}")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads((tmp_path / "a.scores.json").read_text())
    assert (printed["benchmark"], printed["convention"], printed["count"], printed["accuracy"]) == (
        "pope",
        "llava",
        4,
        0.75,
    )
    (tmp_path / "a.scores.json").unlink()
    stray = write_lines(tmp_path / "b.jsonl", answers("no", ids=[99]))
    for args, message in (
        (["--benchmark=pope", f"--answers-file={stray}"], "lacks 1 answered questions"),
        (["--benchmark=pope", "--convention=x", f"--answers-file={answers_file}"], "--convention: pope is scored"),
        (["--benchmark=nope", f"--answers-file={answers_file}"], "--benchmark: unknown 'nope'"),
    ):
        proc = run_score(*args, f"--annotation-file={gt}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr
        assert not list(tmp_path.glob("*.scores.json"))


def test_every_benchmark_names_its_default_convention_first():
    assert {name: spec.conventions[0] for name, spec in benchmarks.BENCHMARKS.items()} == {
        "textvqa": "llava",
        "vqav2": "lmms-eval",
        "gqa": "llava",
        "pope": "llava",
        "mme": "lmms-eval",
        "scienceqa_img": "llava",
        "exact": "exact",
    }
