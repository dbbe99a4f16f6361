"""Our scorers against the references' own code, on a few hundred generated
awkward answers per benchmark (case, spacing, newlines, punctuation, number
words, articles, contractions, "The answer is B." and the like).

lmms-eval convention: lmms-eval 0.7.3 itself (installed with --no-deps, see
the README's test command): its task functions, and for GQA its exact_match
metric with gqa.yaml's settings. Every lmms-eval answer is trimmed by the
task harness before a task sees it (lmms_eval/api/task.py lines 1585-1589,
ConfigurableTask.process_results), restated here as `harness_trim`.

LLaVA convention: LLaVA's scripts are no package; each is restated below
line by line, citing haotian-liu/LLaVA's file and lines, quirks included.
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

# lmms-eval comes from the README's test command; missing, these tests fail rather than skip.
from lmms_eval.api import metrics as lmms_metrics
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from lmms_eval.tasks.mme import utils as lmms_mme
from lmms_eval.tasks.pope import utils as lmms_pope
from lmms_eval.tasks.scienceqa import utils as lmms_sqa
from lmms_eval.tasks.textvqa import utils as lmms_textvqa
from lmms_eval.tasks.vqav2 import utils as lmms_vqav2

from skipvision_jax.vqa.benchmarks import MME_COGNITION, MME_PERCEPTION, read_annotations, score

# ---------------------------------------------------------------- generated answers

WORDS = [
    "yes", "no", "Yes", "NO", "two", "2", "ten", "none", "zero", "t-shirt", "man's", "1,000", "10%", "3.5",
    "the dog", "a cat", "An apple", "couldnt", "dont", "o'clock", "its", "red", "Red.", "blue and white",
    "left", "right side", "stop sign", "B", "C", "A", "b", "e", "not sure", "No, it is not.", "Yes, there is.",
    "yes.", "no!", "maybe", "N", "y", "nope", "Table", "table.", "tables", "wood", "New York", "u.s.",
]  # fmt: skip
DECORATIONS = [
    lambda t: t,
    lambda t: t,
    lambda t: t.upper(),
    lambda t: t.lower(),
    lambda t: f" {t} ",
    lambda t: f"{t}\n",
    lambda t: f"\t{t}",
    lambda t: f"{t}.",
    lambda t: f"{t}?",
    lambda t: f"{t}!",
    lambda t: f"{t}, ",
    lambda t: f"The answer is {t}.",
    lambda t: f"The answer is {t}",
    lambda t: f"{t}. Because it is.",
    lambda t: f"{t}.\nExplanation: none",
    lambda t: f"the {t}",
    lambda t: f"({t})",
    lambda t: f"{t} - {t}",
    lambda t: f"{t}.{t}",
]


LETTERS = ["A", "B", "C", "D", "E", "a", "b", "c", "B. option 1", "option 2", "C. x", "Answer: B", "(A)"]


def awkward(rng: random.Random, words: list[str] = WORDS) -> str:
    return rng.choice(DECORATIONS)(rng.choice(words))


def human(rng: random.Random, pool: list[str]) -> str:
    return rng.choice([lambda t: t, lambda t: t.capitalize(), lambda t: f"{t} ", lambda t: f"the {t}"])(
        rng.choice(pool)
    )


N = 300


def annotations(tmp_path, benchmark: str, rows: list[dict], convention: str) -> dict:
    path = tmp_path / f"{benchmark}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return read_annotations(str(path), benchmark, convention)


def ours_each(tmp_path, benchmark: str, convention: str, rows: list[dict], texts: list[str]) -> list[float]:
    gt = annotations(tmp_path, benchmark, rows, convention)
    return [
        score(benchmark, [{"question_id": row["question_id"], "text": text}], gt, convention)["accuracy"]
        for row, text in zip(rows, texts)
    ]


def harness_trim(text: str) -> str:
    """lmms_eval/api/task.py lines 1585-1589: `res.strip()` of every generated answer."""
    return text.strip()


# ---------------------------------------------------------------- lmms-eval: its own functions


def test_textvqa_lmms_eval(tmp_path):
    rng = random.Random(0)
    pool = ["two", "2", "t-shirt", "man's", "the dog", "red", "1,000", "stop sign", "couldn't", "10%"]
    rows = [{"question_id": i, "answers": [human(rng, pool) for _ in range(10)]} for i in range(N)]
    texts = [awkward(rng) if i % 3 else rng.choice(pool) for i in range(N)]
    expected = [
        lmms_textvqa.textvqa_process_results(copy.deepcopy(row), [harness_trim(text)])["exact_match"]
        for row, text in zip(rows, texts)
    ]
    assert sum(expected) > 10  # some right, not a sea of zeros
    assert ours_each(tmp_path, "textvqa", "lmms-eval", rows, texts) == pytest.approx(expected)


def test_vqav2_lmms_eval(tmp_path):
    rng = random.Random(1)
    pool = ["yes", "no", "two", "2", "t-shirt", "man's", "the dog", "1,000", "red."]
    rows = [
        {
            "question_id": i,
            "answers": [
                {
                    "answer": human(rng, pool) if i % 4 else pool[i % len(pool)],
                    "answer_id": j,
                    "answer_confidence": "yes",
                }
                for j in range(10)
            ],
        }
        for i in range(N)
    ]
    texts = [awkward(rng) if i % 3 else rng.choice(pool) for i in range(N)]
    expected = [
        lmms_vqav2.vqav2_process_results(copy.deepcopy(row), [harness_trim(text)])["exact_match"]
        for row, text in zip(rows, texts)
    ]
    assert sum(expected) > 10
    assert ours_each(tmp_path, "vqav2", "lmms-eval", rows, texts) == pytest.approx(expected)


def test_gqa_lmms_eval(tmp_path):
    rng = random.Random(2)
    pool = ["table", "yes", "no", "left", "t-shirt", "red"]
    rows = [{"question_id": str(i), "answer": rng.choice(pool)} for i in range(N)]
    texts = [awkward(rng) if i % 3 else rng.choice(pool) for i in range(N)]
    # gqa.yaml's metric_list: exact_match with ignore_case and ignore_punctuation.
    expected = [
        float(
            lmms_metrics.exact_match_hf_evaluate(
                predictions=[harness_trim(text)], references=[row["answer"]], ignore_case=True, ignore_punctuation=True
            )["exact_match"]
        )
        for row, text in zip(rows, texts)
    ]
    assert sum(expected) > 10
    assert ours_each(tmp_path, "gqa", "lmms-eval", rows, texts) == pytest.approx(expected)


def scienceqa_rows(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(N):
        choices = [f"option {j}" for j in range(rng.randint(2, 5))]
        rows.append({"question_id": i, "answer": rng.randrange(len(choices)), "choices": choices})
    return rows


def test_scienceqa_img_lmms_eval(tmp_path):
    rng = random.Random(3)
    rows = scienceqa_rows(rng)
    texts = [awkward(rng, LETTERS) for _ in range(N)]
    expected = [
        lmms_sqa.sqa_process_results(copy.deepcopy(row), [harness_trim(text)])["exact_match"]
        for row, text in zip(rows, texts)
    ]
    assert sum(expected) > 10
    assert ours_each(tmp_path, "scienceqa_img", "lmms-eval", rows, texts) == pytest.approx(expected)


def pope_rows(rng: random.Random) -> list[dict]:
    categories = ("adversarial", "popular", "random")
    return [{"question_id": i, "answer": rng.choice(["yes", "no"]), "category": categories[i % 3]} for i in range(N)]


def test_pope_lmms_eval(tmp_path):
    rng = random.Random(4)
    rows = pope_rows(rng)
    texts = [awkward(rng) for _ in range(N)]
    per_doc = [lmms_pope.pope_process_results(row, [harness_trim(text)]) for row, text in zip(rows, texts)]
    ours = score("pope", answers_of(rows, texts), annotations(tmp_path, "pope", rows, "lmms-eval"), "lmms-eval")
    for metric, aggregate in (
        ("accuracy", lmms_pope.pope_aggregate_accuracy),
        ("precision", lmms_pope.pope_aggregate_precision),
        ("recall", lmms_pope.pope_aggregate_recall),
        ("f1", lmms_pope.pope_aggregate_f1_score),
        ("yes_ratio", lmms_pope.pope_aggregate_yes_ratio),
    ):
        assert ours[metric] == pytest.approx(
            aggregate([d[f"pope_{metric}_score" if metric == "f1" else f"pope_{metric}"] for d in per_doc])
        ), metric
    assert 0 < ours["accuracy"] < 1


def answers_of(rows: list[dict], texts: list[str], **extra) -> list[dict]:
    return [{"question_id": row["question_id"], "text": text, **extra} for row, text in zip(rows, texts)]


def test_mme_lmms_eval(tmp_path):
    rng = random.Random(5)
    categories = MME_PERCEPTION + MME_COGNITION
    rows, texts = [], []
    for image in range(N // 2):
        category = categories[image % len(categories)]
        for k in range(2):
            rows.append(
                {
                    "question_id": f"{category}/{image}.png",
                    "question": f"question {k}?",
                    "answer": rng.choice(["Yes", "No"]),
                    "category": category,
                }
            )
            texts.append(awkward(rng))
    per_doc = [lmms_mme.mme_process_results(row, [harness_trim(text)]) for row, text in zip(rows, texts)]
    totals = {
        key: lmms_mme.mme_aggregate_results([d[key] for d in per_doc if key in d])
        for key in ("mme_perception_score", "mme_cognition_score")
    }
    answers = [
        {"question_id": row["question_id"], "prompt": row["question"], "text": text} for row, text in zip(rows, texts)
    ]
    ours = score("mme", answers, annotations(tmp_path, "mme", rows, "lmms-eval"), "lmms-eval")
    assert ours["perception"] == pytest.approx(totals["mme_perception_score"])
    assert ours["cognition"] == pytest.approx(totals["mme_cognition_score"])
    assert ours["perception"] > 0


# ---------------------------------------------------------------- LLaVA: its scripts restated


def llava_textvqa_accuracy(pred_answer: str, gt_answers: list[str]) -> float:
    """llava/eval/m4c_evaluator.py lines 221-257 (TextVQAAccuracyEvaluator), its
    answer processor (lines 7-218) being lmms-eval's EvalAIAnswerProcessor line
    for line (both copy facebookresearch/mmf's; they differ only in formatting)."""
    processor = EvalAIAnswerProcessor()
    answers = [processor(a) for a in gt_answers]  # line 229
    assert len(answers) == 10  # line 230
    gt = list(enumerate(answers))  # line 231
    unique_scores = {}
    for unique in set(answers):  # lines 235-244
        accs = []
        for gt_answer in gt:
            others = [item for item in gt if item != gt_answer]
            matching = [item for item in others if item[1] == unique]
            accs.append(min(1, float(len(matching)) / 3))
        unique_scores[unique] = sum(accs) / len(accs)
    return unique_scores.get(processor(pred_answer), 0.0)  # lines 251-253


def test_textvqa_llava(tmp_path):
    rng = random.Random(6)
    pool = ["two", "2", "t-shirt", "man's", "the dog", "red", "1,000", "stop sign", "couldn't", "10%"]
    rows = [{"question_id": i, "answers": [human(rng, pool) for _ in range(10)]} for i in range(N)]
    texts = [awkward(rng) if i % 3 else rng.choice(pool) for i in range(N)]
    expected = [llava_textvqa_accuracy(text, row["answers"]) for row, text in zip(rows, texts)]
    assert sum(expected) > 10
    assert ours_each(tmp_path, "textvqa", "llava", rows, texts) == pytest.approx(expected)


def test_gqa_llava(tmp_path):
    """scripts/convert_gqa_for_eval.py line 14 (`res['text'].rstrip('.').lower()`),
    then GQA's eval.py (scripts/v1_5/eval/gqa.sh runs it): prediction == answer."""
    rng = random.Random(7)
    pool = ["table", "yes", "no", "left", "t-shirt", "red"]
    rows = [{"question_id": str(i), "answer": rng.choice(pool)} for i in range(N)]
    texts = [awkward(rng) if i % 3 else rng.choice(pool) for i in range(N)]
    expected = [float(text.rstrip(".").lower() == row["answer"]) for row, text in zip(rows, texts)]
    assert sum(expected) > 10
    assert ours_each(tmp_path, "gqa", "llava", rows, texts) == pytest.approx(expected)


def llava_pope(texts: list[str], labels: list[str]) -> dict:
    """llava/eval/eval_pope.py lines 5-62 (eval_pope), for one category; a
    zero division there is None here."""
    predictions = []
    for text in texts:  # lines 8-20
        if text.find(".") != -1:
            text = text.split(".")[0]
        text = text.replace(",", "")
        words = text.split(" ")
        predictions.append("no" if "No" in words or "not" in words or "no" in words else "yes")
    label_list = [0 if label == "no" else 1 for label in labels]  # lines 22-26
    pred_list = [0 if p == "no" else 1 for p in predictions]  # lines 28-33
    yes_ratio = pred_list.count(1) / len(pred_list)  # line 37
    tp = sum(p == 1 and t == 1 for p, t in zip(pred_list, label_list))  # lines 39-48
    fp = sum(p == 1 and t == 0 for p, t in zip(pred_list, label_list))
    tn = sum(p == 0 and t == 0 for p, t in zip(pred_list, label_list))
    fn = sum(p == 0 and t == 1 for p, t in zip(pred_list, label_list))
    precision = tp / (tp + fp) if tp + fp else None  # lines 53-56
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (
        None
        if precision is None or recall is None or precision + recall == 0
        else 2 * precision * recall / (precision + recall)
    )
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": yes_ratio,
    }


def test_pope_llava(tmp_path):
    rng = random.Random(8)
    rows = pope_rows(rng)
    for row in rows[::7]:
        row["answer"] = "No"  # eval_pope.py reads any label but "no" as yes
    texts = [awkward(rng) for _ in range(N)]
    ours = score("pope", answers_of(rows, texts), annotations(tmp_path, "pope", rows, "llava"), "llava")
    for category in ("adversarial", "popular", "random"):
        picked = [(text, row["answer"]) for row, text in zip(rows, texts) if row["category"] == category]
        expected = llava_pope([t for t, _ in picked], [label for _, label in picked])
        for metric, value in expected.items():
            assert ours["by_category"][category][metric] == pytest.approx(value), (category, metric)


def llava_scienceqa_right(pred_text: str, choices: list, answer: int) -> bool:
    """llava/eval/eval_science_qa.py lines 65-77, 28-35 and 91."""
    options = ["A", "B", "C", "D", "E"]  # line 15
    if pred_text in options:
        letter = pred_text
    elif len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
        letter = pred_text[0]
    else:
        res = re.compile(r"The answer is ([A-Z]).").findall(pred_text)
        letter = res[0] if len(res) == 1 else "FAILED"
    pred_idx = options.index(letter) if letter in options[: len(choices)] else -1  # get_pred_idx
    return pred_idx == answer


def test_scienceqa_img_llava(tmp_path):
    rng = random.Random(9)
    rows = scienceqa_rows(rng)
    texts = [awkward(rng, LETTERS) for _ in range(N)] + ["The answer is B. The answer is C."]
    rows.append({"question_id": N, "answer": 1, "choices": ["x", "y", "z"]})
    expected = [float(llava_scienceqa_right(text, row["choices"], row["answer"])) for row, text in zip(rows, texts)]
    assert sum(expected) > 10
    assert ours_each(tmp_path, "scienceqa_img", "llava", rows, texts) == pytest.approx(expected)
