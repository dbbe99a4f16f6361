"""Scoring answers against annotations, with the VQA answer normalization.

The normalization follows the official VQA evaluation (visualqa.org/evaluation.html):
lower case; periods removed except as a decimal point; punctuation other than
the apostrophe and the colon replaced by a space, except a comma between
digits (100,978); number words to digits; the articles a, an, the removed;
a contraction missing its apostrophe given one back (dont -> don't).

VQA accuracy of an answer against n human answers is the mean, over the n
ways to leave one human out, of min(#others that gave it / 3, 1): with ten
humans, four or more matching score 1, three 0.9 and one 0.3.
"""

from __future__ import annotations

import collections
import itertools
import re
import string

from skipvision_jax.vqa.files import read_jsonl

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# Contractions whose apostrophe-less spelling is no other English word
# ("its", "ill", "well", "were", "wed", "shell", "hell" are left alone).
CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've he's "
    "how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't shouldn't've somebody'd somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's "
    "there'd there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _missing_apostrophe_forms(word: str) -> list[str]:
    """Every spelling of `word` with one or more of its apostrophes dropped."""
    parts = word.split("'")
    forms = []
    for kept in itertools.product(("'", ""), repeat=len(parts) - 1):
        if all(kept):
            continue
        forms.append(parts[0] + "".join(sep + part for sep, part in zip(kept, parts[1:])))
    return forms


CONTRACTION_FIXES = {form: word for word in CONTRACTIONS for form in _missing_apostrophe_forms(word)}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCTUATION = re.compile("[" + re.escape("".join(c for c in string.punctuation if c not in "'.:,")) + "]|,")


def normalize_answer(text: str) -> str:
    text = " ".join(text.lower().split())
    text = _DIGIT_COMMA.sub("\0", text)  # shield 100,978 from the comma rule
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text).replace("\0", ",")
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTION_FIXES.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official VQA accuracy (already normalized strings)."""
    if len(human_answers) == 1:
        return float(prediction == human_answers[0])
    scores = []
    for left_out in range(len(human_answers)):
        others = human_answers[:left_out] + human_answers[left_out + 1 :]
        scores.append(min(sum(answer == prediction for answer in others) / 3, 1.0))
    return sum(scores) / len(scores)


def read_annotations(path: str) -> dict:
    """question_id -> {"answer": str | None, "answers": [str] | None}, normalized."""
    annotations = {}
    for number, record in read_jsonl(path, "annotation file"):
        if "question_id" not in record or not ("answer" in record or "answers" in record):
            raise ValueError(f"annotation file: {path} line {number} needs 'question_id' and 'answer' or 'answers'")
        answers = record.get("answers")
        if answers is not None:
            if not isinstance(answers, list) or not answers:
                raise ValueError(f"annotation file: {path} line {number}: 'answers' must be a non-empty list")
            answers = [normalize_answer(a["answer"] if isinstance(a, dict) else str(a)) for a in answers]
        answer = normalize_answer(str(record["answer"])) if "answer" in record else None
        annotations[record["question_id"]] = {"answer": answer, "answers": answers}
    return annotations


def score_answers(answers: list[dict], annotations: dict, categories: dict | None = None) -> dict:
    """Exact match (against `answer`, or membership in `answers`) and, where
    human answer lists are given, VQA accuracy: overall and per category.
    Answer lines carrying an "error" (unreadable image, ...) are counted apart."""
    scored = [a for a in answers if "error" not in a]
    missing = [a["question_id"] for a in scored if a["question_id"] not in annotations]
    if missing:
        raise ValueError(f"annotation file: lacks {len(missing)} answered question ids (first: {missing[0]!r})")
    categories = categories or {}
    groups: dict[str, list[tuple[float, float | None]]] = collections.defaultdict(list)
    for line in scored:
        truth = annotations[line["question_id"]]
        prediction = normalize_answer(line["text"])
        exact = prediction == truth["answer"] if truth["answer"] is not None else prediction in truth["answers"]
        accuracy = vqa_accuracy(prediction, truth["answers"]) if truth["answers"] is not None else None
        for group in ("all", categories.get(line["question_id"]) or None):
            if group is not None:
                groups[group].append((float(exact), accuracy))

    def summary(rows):
        out = {"count": len(rows), "exact_match": sum(e for e, _ in rows) / max(len(rows), 1)}
        accuracies = [a for _, a in rows if a is not None]
        if accuracies:
            out["vqa_accuracy"] = sum(accuracies) / len(accuracies)
        return out

    result = summary(groups.pop("all", []))
    result["errors"] = len(answers) - len(scored)
    result["by_category"] = {name: summary(rows) for name, rows in sorted(groups.items())}
    return result


def format_scores(scores: dict) -> str:
    rows = [("all", scores)] + list(scores["by_category"].items())
    lines = [f"{'category':<16} {'count':>6} {'exact match':>12} {'VQA acc':>8}"]
    for name, row in rows:
        vqa = f"{row['vqa_accuracy']:.4f}" if "vqa_accuracy" in row else "-"
        lines.append(f"{name:<16} {row['count']:>6} {row['exact_match']:>12.4f} {vqa:>8}")
    if scores["errors"]:
        lines.append(f"({scores['errors']} questions not answered: see their 'error' field)")
    return "\n".join(lines)
