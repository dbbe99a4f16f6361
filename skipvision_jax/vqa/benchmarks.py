"""Per-benchmark scorers, computed as the published tables compute them.

Two conventions where the references differ (each scorer names its files):

    llava      LLaVA's `llava/eval/` and `scripts/` (haotian-liu/LLaVA): the
               tables of the Skip-Vision paper, FastV and SparseVLM
    lmms-eval  lmms-eval's task utils (EvolvingLMMs-Lab/lmms-eval,
               `lmms_eval/tasks/<task>/utils.py`): newer papers

    benchmark      conventions (default first)   annotation fields
    textvqa        llava, lmms-eval              answers: 10 strings
    vqav2          lmms-eval                     answers: strings or {"answer": ...}
    gqa            llava, lmms-eval              answer
    pope           llava, lmms-eval              answer (yes/no), category
    mme            lmms-eval                     question, answer (Yes/No), category; question_id the image
    scienceqa_img  llava, lmms-eval              answer (an index), choices
    exact          exact                         answer (the embedded tasks: plain exact match)

LLaVA scores VQAv2 on the EvalAI server (its scripts only write the
submission) and MME with MME's own tool, so those take lmms-eval's, which
reimplement the same computations. Quirks of the references are kept and
named where they are.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Callable

from skipvision_jax.vqa.files import read_jsonl

# ---------------------------------------------------------------- EvalAI's answer processor
# EvalAIAnswerProcessor: LLaVA's llava/eval/m4c_evaluator.py and lmms-eval's
# lmms_eval/tasks/_task_utils/vqa_eval_metric.py (both from facebookresearch/mmf).

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
ARTICLES = ("a", "an", "the")
# The contractions the processor restores: each spelled with any one of its
# apostrophes dropped maps back to it ("couldnt've" and "couldn'tve", not
# "couldntve"). Words that are English without the apostrophe (its, well,
# shed, ...) are absent, as in the reference.
_RESTORED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()
CONTRACTIONS = {word[:i] + word[i + 1 :]: word for word in _RESTORED for i, char in enumerate(word) if char == "'"}
# Quirks of the reference table: "somebody'd" is mapped the wrong way round,
# and its capitalized entries (Im, Ive, Id've) never match lower-cased text.
CONTRACTIONS["somebody'd"] = "somebodyd"
PUNCTUATIONS = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")
# The reference's pattern is "(?!<=\d)(\.)(?!\d)": a lookahead where a
# lookbehind was meant, so every period not followed by a digit goes, and it
# passes re.UNICODE (32) as the count: at most 32 periods are removed.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """EvalAIAnswerProcessor.process_punctuation: a punctuation mark next to a
    space, or any mark at all once the text holds a comma between digits, is
    deleted; otherwise it becomes a space. Then periods (see `_PERIOD`)."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATIONS:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if spaced or delete_all else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """EvalAIAnswerProcessor.process_digit_article: number words to digits,
    articles dropped, contractions restored (after lower-casing)."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def evalai_answer(text: str) -> str:
    """EvalAIAnswerProcessor.__call__: lower case, commas and question marks
    deleted ("1,000" -> "1000"), "'s" split off ("man's" -> "man 's"), then
    punctuation, digits and articles. Keeps "10%" (no rule for %)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def leave_one_out_accuracy(prediction: str, human_answers: list[str]) -> float:
    """VQA accuracy: the mean over the human answers of min(#other humans who
    gave the prediction / 3, 1), each human left out in turn by its place."""
    scores = []
    for left_out in range(len(human_answers)):
        matching = sum(answer == prediction for i, answer in enumerate(human_answers) if i != left_out)
        scores.append(min(1.0, matching / 3))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- per-answer scores


def textvqa_score(convention: str, text: str, truth: dict) -> float:
    """llava: m4c_evaluator.TextVQAAccuracyEvaluator (eval_textvqa.py), which
    requires ten human answers; lmms-eval: textvqa_process_results. Both run
    EvalAI's processor on the prediction and on every human answer."""
    return leave_one_out_accuracy(evalai_answer(text), [evalai_answer(a) for a in truth["answers"]])


def vqav2_score(convention: str, text: str, truth: dict) -> float:
    """lmms-eval's vqav2_process_results (tasks/vqav2/utils.py lines 15-43):
    the prediction and every human answer have newlines and tabs made spaces
    and are trimmed, then go through EvalAI's punctuation and digit/article
    steps (not its lower-casing word step: process_digit_article lower-cases).
    A human left out is every answer object equal to it (VQAv2's carry
    distinct answer_ids)."""
    clean = lambda a: process_digit_article(process_punctuation(a.replace("\n", " ").replace("\t", " ").strip()))
    prediction = clean(text)
    answers = [{**a, "answer": clean(a["answer"])} for a in truth["answers"]]
    scores = []
    for left_out in answers:
        matching = sum(a["answer"] == prediction for a in answers if a != left_out)
        scores.append(min(1.0, matching / 3))
    return sum(scores) / len(scores)


_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def gqa_score(convention: str, text: str, truth: dict) -> float:
    """llava: scripts/convert_gqa_for_eval.py line 14 (text.rstrip('.').lower()),
    then GQA's eval.py (prediction == answer); lmms-eval: gqa.yaml's
    exact_match with ignore_case and ignore_punctuation (api/metrics.py
    exact_match_hf_evaluate: lower-cased, string.punctuation deleted) of the
    answer `score` has trimmed."""
    if convention == "llava":
        return float(text.rstrip(".").lower() == truth["answer"])
    clean = lambda s: s.lower().translate(_PUNCTUATION_TABLE)
    return float(clean(text) == clean(truth["answer"]))


def pope_truth(convention: str, answer: str) -> str:
    """llava: eval_pope.py lines 22-26 (the label "no" is no, anything else,
    "No" included, yes); lmms-eval: pope_process_results (lower-cased, trimmed)."""
    if convention == "llava":
        return "no" if answer == "no" else "yes"
    return answer.lower().strip()


def pope_prediction(convention: str, text: str) -> str:
    """llava: eval_pope.py lines 11-20 (the first sentence, commas deleted,
    'No', 'no' or 'not' among its space-separated words means no, anything
    else yes); lmms-eval: pope_process_results (lower-cased and stripped, kept
    as it is: only "yes" and "no" can be right)."""
    if convention == "llava":
        words = text.split(".")[0].replace(",", "").split(" ")
        return "no" if {"No", "no", "not"} & set(words) else "yes"
    return text.lower().strip()


def mme_prediction(text: str) -> str:
    """lmms-eval's mme parse_pred_ans (from Otter): yes/no, or y/n, or yes/no
    within the first four characters, else other."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


OPTIONS = ("A", "B", "C", "D", "E")  # LLaVA's --options


def scienceqa_score(convention: str, text: str, truth: dict) -> float:
    """llava: eval_science_qa.py lines 65-77 and 28-35: the answer exactly a
    letter of --options, or "B. ..." (a letter, then ". "), or exactly one
    match of `The answer is ([A-Z]).` (a character must follow the letter), else
    FAILED; the letter counts only among the first len(choices) options.
    lmms-eval: sqa_process_results (tasks/scienceqa/utils.py lines 35-44): the
    trimmed answer equal to the letter case aside, or an upper-case letter and
    a period ("B." right, "The answer is B." wrong)."""
    target = OPTIONS[truth["answer"]]
    if convention == "lmms-eval":
        prediction = text.strip()
        if prediction.lower() == target.lower():
            return 1.0
        if len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == ".":
            return float(prediction[0].lower() == target.lower())
        return 0.0
    if text in OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else "FAILED"
    return float(letter in OPTIONS[: len(truth["choices"])] and letter == target)


def exact_match(text: str, answer: str) -> bool:
    """The embedded tasks' exact match: the same words, case aside (nothing
    else is normalized: "-" marks an empty cell in the detail task's answers)."""
    return text.lower().split() == answer.lower().split()


def exact_score(convention: str, text: str, truth: dict) -> float:
    return float(exact_match(text, str(truth["answer"])))


# ---------------------------------------------------------------- benchmarks


def pope_verdict(convention: str, text: str, truth: dict) -> tuple[str, str]:
    return pope_prediction(convention, text), pope_truth(convention, truth["answer"])


def mme_score(convention: str, text: str, truth: dict) -> float:
    """lmms-eval's mme_process_results: the parsed answer against the truth (lower-cased, periods deleted)."""
    return float(mme_prediction(text) == truth["answer"].lower().strip().replace(".", ""))


# ---------------------------------------------------------------- annotation lines
# Each returns one line as its scorer reads it, or raises ValueError naming what is
# wrong with it (`where`: its file and number).


def read_as_is(convention: str, record: dict, where: str) -> dict:
    return record


def _answer_list(record: dict, where: str) -> list:
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{where}: 'answers' must be a non-empty list")
    return answers


def read_textvqa(convention: str, record: dict, where: str) -> dict:
    answers = _answer_list(record, where)
    if not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be strings")
    if convention == "llava" and len(answers) != 10:
        raise ValueError(f"{where}: LLaVA's TextVQA scorer needs 10 human answers, found {len(answers)}")
    return record


def read_vqav2(convention: str, record: dict, where: str) -> dict:
    answers = _answer_list(record, where)
    if not all(isinstance(a, str) or isinstance(a, dict) and "answer" in a for a in answers):
        raise ValueError(f"{where}: 'answers' must be strings or objects with an 'answer'")
    # Plain strings become answer objects with distinct answer_ids, as VQAv2's carry.
    answers = [a if isinstance(a, dict) else {"answer": a} for a in answers]
    return {**record, "answers": [{"answer_id": i, **a} for i, a in enumerate(answers)]}


def read_yes_no(convention: str, record: dict, where: str) -> dict:
    answer = record.get("answer")
    if not isinstance(answer, str) or answer.lower().strip().rstrip(".") not in ("yes", "no"):
        raise ValueError(f"{where}: 'answer' must be yes or no, got {answer!r}")
    return record


def read_choice(convention: str, record: dict, where: str) -> dict:
    answer, choices = record.get("answer"), record.get("choices")
    if not isinstance(choices, list) or not 0 < len(choices) <= len(OPTIONS):
        raise ValueError(f"{where}: 'choices' must be a list of 1 to {len(OPTIONS)} options")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be the index of a choice, got {answer!r}")
    return record


# ---------------------------------------------------------------- aggregates


def mean_scores(convention: str, rows: list[tuple[dict, dict, float]], categories: dict | None) -> dict:
    """The mean score (and per category where `categories`, question_id ->
    category, names one) of the benchmarks scored answer by answer."""
    scores = [verdict for _, _, verdict in rows]
    result = {"accuracy": sum(scores) / max(len(scores), 1)}
    if categories:
        groups = collections.defaultdict(list)
        for answer, _, verdict in rows:
            if categories.get(answer["question_id"]):
                groups[categories[answer["question_id"]]].append(verdict)
        result["by_category"] = {c: {"count": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(groups.items())}
    return result


def pope_scores(convention: str, rows: list[tuple[dict, dict, tuple[str, str]]], categories: dict | None) -> dict:
    """POPE's metrics over all answers and per POPE category."""
    groups = collections.defaultdict(list)
    for _, truth, pair in rows:
        groups[truth["category"]].append(pair)
    result = _pope_metrics(convention, [pair for _, _, pair in rows])
    result["by_category"] = {c: _pope_metrics(convention, p) for c, p in sorted(groups.items())}
    return result


def mme_scores(convention: str, rows: list[tuple[dict, dict, float]], categories: dict | None) -> dict:
    """MME's subtask scores and the perception and cognition sums."""
    by_category = _mme_scores([(truth, verdict) for _, truth, verdict in rows])
    result = {"by_category": by_category}
    for total, subtasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        result[total] = sum(v["score"] for c, v in by_category.items() if c in subtasks)
    return result


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """How one benchmark scores: each answer judged alone, then aggregated."""

    conventions: tuple[str, ...]  # the default first
    fields: tuple[str, ...]  # what each annotation line carries besides question_id
    read: Callable  # (convention, annotation line, where) -> the line as `judge` reads it, or ValueError
    judge: Callable  # (convention, text, annotation line) -> this answer's verdict
    aggregate: Callable  # (convention, [(answer, annotation, verdict)], categories) -> scores
    # MME's question files give an image's questions the image's id: a question is then (id, its text).
    keyed_by_text: bool = False

    def key(self, question_id, text: str | None):
        """A question's key in the annotations (text: the question's, as asked)."""
        return (question_id, text) if self.keyed_by_text else question_id


BENCHMARKS = {
    "textvqa": Benchmark(("llava", "lmms-eval"), ("answers",), read_textvqa, textvqa_score, mean_scores),
    "vqav2": Benchmark(("lmms-eval",), ("answers",), read_vqav2, vqav2_score, mean_scores),
    "gqa": Benchmark(("llava", "lmms-eval"), ("answer",), read_as_is, gqa_score, mean_scores),
    "pope": Benchmark(("llava", "lmms-eval"), ("answer", "category"), read_yes_no, pope_verdict, pope_scores),
    "mme": Benchmark(
        ("lmms-eval",), ("question", "answer", "category"), read_yes_no, mme_score, mme_scores, keyed_by_text=True
    ),
    "scienceqa_img": Benchmark(
        ("llava", "lmms-eval"), ("answer", "choices"), read_choice, scienceqa_score, mean_scores
    ),
    "exact": Benchmark(("exact",), ("answer",), read_as_is, exact_score, mean_scores),
}
MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def resolve(benchmark: str, convention: str | None) -> tuple[Benchmark, str]:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"--benchmark: unknown {benchmark!r}, expected one of {list(BENCHMARKS)}")
    spec = BENCHMARKS[benchmark]
    convention = convention or spec.conventions[0]
    if convention not in spec.conventions:
        raise ValueError(f"--convention: {benchmark} is scored under {list(spec.conventions)}, not {convention!r}")
    return spec, convention


def read_annotations(path: str, benchmark: str, convention: str | None = None) -> dict:
    """key -> annotation line, the key the question_id (for MME the pair
    (question_id, question): its two questions share the image's id). Every
    missing or malformed field is a one-line error naming the file and line."""
    spec, convention = resolve(benchmark, convention)
    annotations, seen = {}, {}
    for number, record in read_jsonl(path, "annotation file"):
        where = f"annotation file: {path} line {number}"
        missing = [field for field in ("question_id",) + spec.fields if field not in record]
        if missing:
            raise ValueError(f"{where} lacks {missing} (a {benchmark} line needs question_id and {list(spec.fields)})")
        record = spec.read(convention, record, where)
        key = spec.key(record["question_id"], record.get("question"))
        if key in seen:
            raise ValueError(f"{where} repeats {key!r} (first on line {seen[key]})")
        seen[key] = number
        annotations[key] = record
    if spec.keyed_by_text:  # MME scores an image's two questions as a pair
        per_image = collections.Counter(qid for qid, _ in annotations)
        odd = next((qid for qid, n in per_image.items() if n != 2), None)
        if odd is not None:
            raise ValueError(
                f"annotation file: {path}: MME image {odd!r} has {per_image[odd]} questions, MME scores pairs"
            )
    return annotations


def _pope_metrics(convention: str, pairs: list[tuple[str, str]]) -> dict:
    """(prediction, truth) pairs -> eval_pope.py's or lmms-eval's aggregates.
    Precision or recall over an empty set: 0 under lmms-eval; eval_pope.py
    divides by zero there, reported as None."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    ratio = lambda a, b: a / b if b else (0.0 if convention == "lmms-eval" else None)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = ratio(2 * precision * recall, precision + recall)
    # lmms-eval's pope_aggregate_yes_ratio counts the ground truth's yeses, LLaVA's the predictions'.
    yes_ratio = sum((t if convention == "lmms-eval" else p) == "yes" for p, t in pairs) / len(pairs)
    accuracy = sum(p == t for p, t in pairs) / len(pairs)
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}


def _mme_scores(rows: list[tuple[dict, float]]) -> dict:
    """lmms-eval's mme_aggregate_results: per subtask, the mean over images of
    acc (the share of its two questions right, x100) + acc+ (both right, x100)."""
    by_category: dict[str, dict] = collections.defaultdict(lambda: collections.defaultdict(list))
    for truth, score in rows:
        by_category[truth["category"]][truth["question_id"]].append(score)
    out = {}
    for category, images in sorted(by_category.items()):
        single = next((qid for qid, scores in images.items() if len(scores) != 2), None)
        if single is not None:
            raise ValueError(
                f"answers file: MME image {single!r} has {len(images[single])} answered questions, MME scores pairs"
            )
        acc = 100 * sum(sum(s) / 2 for s in images.values()) / len(images)
        acc_plus = 100 * sum(sum(s) == 2 for s in images.values()) / len(images)
        out[category] = {"count": 2 * len(images), "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return out


def score(
    benchmark: str, answers: list[dict], annotations: dict, convention: str | None = None, categories=None
) -> dict:
    """Scores answer lines (eval.py's, or LLaVA's) as the benchmark's reference
    does. An answer without an annotation is an error; answer lines carrying an
    "error" (an unreadable image) are scored as answered, as the references
    score a missing answer, and counted in `errors`. `categories` (question_id
    -> category, from the question file) adds per-category accuracy where the
    benchmark has no categories of its own."""
    spec, convention = resolve(benchmark, convention)
    if convention == "lmms-eval":  # its harness trims every answer before a task scores it (api/task.py 1585-1589)
        answers = [{**a, "text": a["text"].strip()} for a in answers]
    key = lambda a: spec.key(a["question_id"], a.get("prompt"))
    missing = [key(a) for a in answers if key(a) not in annotations]
    if missing:
        raise ValueError(f"annotation file: lacks {len(missing)} answered questions (first: {missing[0]!r})")
    rows = [(a, annotations[key(a)], spec.judge(convention, a["text"], annotations[key(a)])) for a in answers]
    result = {"benchmark": benchmark, "convention": convention, "count": len(rows)}
    result.update(spec.aggregate(convention, rows, categories))
    result["errors"] = sum("error" in a for a in answers)
    return result
