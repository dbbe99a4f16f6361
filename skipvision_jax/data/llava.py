"""LLaVA-format data: a JSON list of conversations plus an image folder.

    [{"id": "...", "image": "relative/path.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nQuestion"},
                        {"from": "gpt", "value": "Answer"}, ...]}]

Records are checked when the source is built (structure) and when an example
is loaded (image). A bad record raises `BadRecord` with its id; the pipeline
either counts and skips it or stops with that one-line message
(`data.on_bad_record`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from skipvision_jax.data.images import ImageError, load_image, preprocess
from skipvision_jax.data.templates import IMAGE_TAG, ConversationCodec

log = logging.getLogger(__name__)


class BadRecord(ValueError):
    """A malformed record, or one whose image is missing or corrupt."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation, in no model's format yet (the image
    belongs to the first user turn)."""

    role: str  # system | user | assistant
    text: str


def validate_record(record, index: int) -> dict:
    """Returns the record, or raises BadRecord naming it."""
    rid = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
    if not isinstance(record, dict):
        raise BadRecord(f"record {rid}: not a JSON object")
    if not isinstance(record.get("image"), str):
        raise BadRecord(f"record {rid}: missing 'image' path")
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        raise BadRecord(f"record {rid}: 'conversations' must be a non-empty list of human/gpt pairs")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise BadRecord(f"record {rid}: turn {i} must be {{'from': '{expected}', 'value': str}}")
    if sum(turn["value"].count(IMAGE_TAG) for turn in turns) != 1 or IMAGE_TAG not in turns[0]["value"]:
        raise BadRecord(f"record {rid}: the first human turn must hold the one {IMAGE_TAG} tag")
    return {**record, "id": str(rid)}


class LlavaSource:
    """grain random-access source over the well-formed records (raw dicts, images not loaded).

    Malformed records are counted in `skipped` (`on_bad_record="skip"`) or stop
    the build with their id (`"raise"`)."""

    def __init__(self, json_path: str, on_bad_record: str = "skip", field: str = "data.json_path"):
        if on_bad_record not in ("skip", "raise"):
            raise ValueError(f"data.on_bad_record: unknown {on_bad_record!r}, expected 'skip' or 'raise'")
        try:
            with open(json_path) as f:
                records = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{field}: no such file {json_path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{field}: {json_path} is not valid JSON ({err})") from None
        if not isinstance(records, list):
            raise ValueError(f"{field}: {json_path} must hold a JSON list of records")
        self.records, self.skipped = [], []
        for index, record in enumerate(records):
            try:
                self.records.append(validate_record(record, index))
            except BadRecord as err:
                if on_bad_record == "raise":
                    raise
                self.skipped.append(str(err))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def held_out(self, count: int, seed: int) -> tuple[LlavaSource, LlavaSource]:
        """(the rest, `count` records held back): a seeded draw, so a rerun holds back the same ones."""
        order = np.random.default_rng(seed).permutation(len(self.records))
        held = set(order[:count].tolist())
        rest, back = (object.__new__(LlavaSource) for _ in range(2))
        rest.records = [r for i, r in enumerate(self.records) if i not in held]
        back.records = [r for i, r in enumerate(self.records) if i in held]
        rest.skipped, back.skipped = self.skipped, []
        return rest, back


class LlavaTransform:
    """Raw record -> fixed-shape example: the image preprocessed to the tower's
    size, the conversation tokenized by the run's template
    (`templates.ConversationCodec`), loss on the answers, padded (or, past
    `text_len`, truncated and counted) to `text_len`."""

    def __init__(self, codec: ConversationCodec, image_dir: str, image_size: int, text_len: int):
        self.codec, self.image_dir, self.image_size, self.text_len = codec, image_dir, image_size, text_len
        self.truncated = 0
        self._noted_resize = False

    def tokens(self, record: dict) -> tuple[list[int], list[bool]]:
        """Token ids (the prefix before the image included) and their loss mask."""
        try:
            return self.codec.example([turn["value"] for turn in record["conversations"]])
        except ValueError as err:
            raise BadRecord(f"record {record['id']}: {err}") from None

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        rid = record["id"]
        try:
            image = load_image(os.path.join(self.image_dir, record["image"]))
        except ImageError as err:
            raise BadRecord(f"record {rid}: {err}") from None
        if not self._noted_resize and image.size != (self.image_size, self.image_size):
            self._noted_resize = True
            log.info(
                "images are resized to the tower's %d x %d (record %s is %d x %d)",
                self.image_size,
                self.image_size,
                rid,
                *image.size,
            )
        ids, mask = self.tokens(record)
        if len(ids) > self.text_len:  # as LLaVA's tokenizer truncates at model_max_length
            ids, mask = ids[: self.text_len], mask[: self.text_len]
            self.truncated += 1
        pad = self.text_len - len(ids)
        return {
            "pixels": preprocess(image, self.image_size),
            "input_ids": np.array(ids + [self.codec.pad_id] * pad, np.int32),
            "text_mask": np.array([True] * len(ids) + [False] * pad),
            "loss_mask": np.array(mask + [False] * pad),
        }
