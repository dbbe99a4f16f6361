"""LLaVA's evaluation files: question jsonl in, answer jsonl out, chunks.

    questions  {"question_id", "image", "text", "category"?}
    answers    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

A question is known by (question_id, text): MME's files give an image's two
questions the image's id, so an id may repeat with other text.

Every problem with a file is a `ValueError` of one line that names the file
and the line number."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: int | str
    image: str
    text: str
    category: str = ""

    @property
    def key(self) -> tuple:
        return (self.question_id, self.text)


def answer_key(line: dict) -> tuple:
    """An answer line's question, as `Question.key`."""
    return (line["question_id"], line.get("prompt"))


def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file {path}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what}: {path} line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{what}: {path} line {number} is not a JSON object")
        records.append((number, record))
    return records


def read_questions(path: str) -> list[Question]:
    questions, seen = [], {}
    for number, record in read_jsonl(path, "question file"):
        for key in ("question_id", "image", "text"):
            if key not in record:
                raise ValueError(f"question file: {path} line {number} has no {key!r}")
        for key in ("image", "text"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise ValueError(f"question file: {path} line {number}: {key!r} must be a non-empty string")
        qid = record["question_id"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise ValueError(f"question file: {path} line {number}: 'question_id' must be an integer or a string")
        key = (qid, record["text"])
        if key in seen:
            raise ValueError(
                f"question file: {path} line {number} repeats question_id {qid!r} with the same text (first on line {seen[key]})"
            )
        seen[key] = number
        questions.append(Question(qid, record["image"], record["text"], str(record.get("category", ""))))
    if not questions:
        raise ValueError(f"question file: {path} holds no question")
    return questions


def chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's `get_chunk`: ceil(n / num_chunks) items per chunk, in order, so
    the chunks' answer files concatenate to the whole run's."""
    if num_chunks < 1:
        raise ValueError(f"--num-chunks: must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx: {chunk_idx} is outside [0, {num_chunks})")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size : (chunk_idx + 1) * size]


def answered_keys(path: str) -> set:
    """The questions (`answer_key`) an answers file already holds. A last line cut short
    (the process died while writing it) is removed, so a resumed run writes
    that answer again, whole, and never twice."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    ids = set()
    for number, line in enumerate(complete.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.add(answer_key(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"answers file: {path} line {number} is not an answer line; move the file aside to start over"
            ) from None
    return ids


def answer_id(model_id: str, question: Question, policy: str) -> str:
    """Deterministic (LLaVA draws a random shortuuid): the same run writes the same file."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{policy}/{question.question_id}/{question.text}").hex[:22]


class AnswerWriter:
    """Appends answer lines; each batch is written and flushed at once, so a
    kill loses at most the batch in flight."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a")

    def write(self, lines: Iterable[dict]) -> None:
        self.file.write("".join(json.dumps(line) + "\n" for line in lines))
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_answers(path: str) -> list[dict]:
    return [record for _, record in read_jsonl(path, "answers file")]


def sibling_path(answers_file: str, suffix: str) -> str:
    """`A.jsonl` -> `A.<suffix>` (scores, per-policy files, tables)."""
    stem = answers_file[: -len(".jsonl")] if answers_file.endswith(".jsonl") else answers_file
    return f"{stem}.{suffix}"
