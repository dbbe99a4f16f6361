"""VQA answer normalization and accuracy, on the cases the official VQA
evaluation page (visualqa.org/evaluation.html) describes, and hand-computed scores."""

from __future__ import annotations

import json

import pytest

from skipvision_jax.vqa.scoring import normalize_answer, read_annotations, score_answers, vqa_accuracy


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Yes", "yes"),  # lower case
        ("  Two   dogs ", "2 dogs"),  # white space folded, number words to digits
        ("none", "0"),
        ("the dog.", "dog"),  # articles and a sentence's period removed
        ("A red car!", "red car"),
        ("an apple", "apple"),
        ("3.5", "3.5"),  # the period of a decimal stays
        ("100,978", "100,978"),  # so does the comma between digits
        ("red, white", "red white"),  # any other comma becomes a space
        ("t-shirt", "t shirt"),  # punctuation becomes a space ...
        ("10:30", "10:30"),  # ... except the colon
        ("don't", "don't"),  # ... and the apostrophe
        ("dont", "don't"),  # a contraction missing its apostrophe gets it back
        ("isnt", "isn't"),
        ("couldntve", "couldn't've"),
        ("its", "its"),  # a real word, not a contraction to repair
        ("theater", "theater"),  # "the" only as a whole word
    ],
)
def test_normalization(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_over_ten_humans():
    # Mean over the 10 ways to leave one human out of min(#matching others / 3, 1).
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)  # (9 * 1/3 + 0) / 10
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)  # (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # (3 * 2/3 + 7) / 10
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy("4", ["2"] * 10) == 0.0
    assert vqa_accuracy("red", ["red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0


def test_scores_by_category_with_errors_counted_apart(tmp_path):
    path = tmp_path / "gt.jsonl"
    rows = [
        {"question_id": 1, "answer": "Two"},
        {"question_id": 2, "answer": "red"},
        {"question_id": 3, "answers": ["yes"] * 3 + ["no"] * 7},
        {"question_id": 4, "answers": [{"answer": "a cat"}] * 10},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    annotations = read_annotations(str(path))
    answers = [
        {"question_id": 1, "text": "2."},  # right after normalization
        {"question_id": 2, "text": "blue"},
        {"question_id": 3, "text": "Yes"},
        {"question_id": 4, "text": "", "error": "image not found: x.png"},
    ]
    scores = score_answers(answers, annotations, {1: "count", 2: "colour", 3: "yesno", 4: "yesno"})
    assert scores["count"] == 3 and scores["errors"] == 1
    assert scores["exact_match"] == pytest.approx(2 / 3)  # 1 right, 2 wrong, 3 in the human list
    assert scores["vqa_accuracy"] == pytest.approx(0.9)  # only question 3 has human answers
    assert (
        scores["by_category"]["count"]["exact_match"] == 1.0 and scores["by_category"]["colour"]["exact_match"] == 0.0
    )
    with pytest.raises(ValueError, match="lacks 1 answered question ids"):
        score_answers(answers + [{"question_id": 9, "text": "x"}], annotations)


def test_malformed_annotation_lines_are_refused(tmp_path):
    path = tmp_path / "gt.jsonl"
    path.write_text('{"question_id": 1, "answer": "x"}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match="line 2 needs 'question_id' and 'answer' or 'answers'"):
        read_annotations(str(path))
