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
import os
from dataclasses import dataclass

import numpy as np

from skipvision_jax.data.images import ImageError, load_image, preprocess

IMAGE_TAG = "<image>"


class BadRecord(ValueError):
    """A malformed record, or one whose image is missing or corrupt."""


@dataclass(frozen=True)
class ChatTemplate:
    """Vicuna-v1 style, as LLaVA-1.5: `{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...`."""

    system: str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions."
    user: str = " USER: "
    assistant: str = " ASSISTANT: "

    def jinja(self, bos: str, eos: str) -> str:
        """This template as a transformers chat template (messages with
        `[{"type": "image"}, {"type": "text", ...}]` content), rendering the text
        `LlavaTransform` tokenizes: `bos` is "" for a tokenizer that adds its own."""
        text = "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        return (
            f"{bos}{self.system}{{% for message in messages %}}"
            f"{{% if message['role'] == 'user' %}}{self.user}{text}{self.assistant}"
            f"{{% elif message['role'] == 'assistant' %}}{text}{eos}{{% endif %}}{{% endfor %}}"
        )


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

    def __init__(self, json_path: str, on_bad_record: str = "skip"):
        if on_bad_record not in ("skip", "raise"):
            raise ValueError(f"data.on_bad_record: unknown {on_bad_record!r}, expected 'skip' or 'raise'")
        try:
            with open(json_path) as f:
                records = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"data.json_path: no such file {json_path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"data.json_path: {json_path} is not valid JSON ({err})") from None
        if not isinstance(records, list):
            raise ValueError(f"data.json_path: {json_path} must hold a JSON list of records")
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


class LlavaTransform:
    """Raw record -> fixed-shape example: image preprocessed, chat template
    tokenized (Hugging Face `tokenizers`), loss on the answers, padded to `text_len`.

    The `<image>` tag is moved to the start of the first human turn (as LLaVA
    does), so the image always follows the same template prefix: its offset is
    static (`image_offset`), which keeps every Skip-FFN partition static.
    """

    def __init__(
        self,
        tokenizer,
        image_dir: str,
        image_size: int,
        text_len: int,
        template: ChatTemplate = ChatTemplate(),
        bos: str = "<s>",
        eos: str = "</s>",
    ):
        self.tokenizer, self.image_dir, self.image_size, self.text_len, self.template = (
            tokenizer,
            image_dir,
            image_size,
            text_len,
            template,
        )
        self.bos_id, self.eos_id = tokenizer.token_to_id(bos), tokenizer.token_to_id(eos)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"data.tokenizer: the tokenizer has no {bos!r} or {eos!r} token")
        self.prefix_ids = [self.bos_id] + self._encode(template.system + template.user)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def image_offset(self) -> int:
        return len(self.prefix_ids)

    def tokens(self, record: dict) -> tuple[list[int], list[bool]]:
        """Token ids after the image and their loss mask (True on answers and their eos)."""
        ids, mask = [], []
        for i, turn in enumerate(record["conversations"]):
            text = turn["value"].replace(IMAGE_TAG, "").strip()
            if i % 2 == 0:
                piece = self._encode(("\n" if i == 0 else self.template.user) + text + self.template.assistant)
                ids += piece
                mask += [False] * len(piece)
            else:
                piece = self._encode(text) + [self.eos_id]
                ids += piece
                mask += [True] * len(piece)
        return ids, mask

    def prompt_ids(self, question: str) -> list[int]:
        """Ids of a one-turn prompt ending where the answer starts (for generation)."""
        return self.prefix_ids + self._encode("\n" + question.strip() + self.template.assistant)

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        rid = record["id"]
        try:
            pixels = preprocess(load_image(os.path.join(self.image_dir, record["image"])), self.image_size)
        except ImageError as err:
            raise BadRecord(f"record {rid}: {err}") from None
        ids, mask = self.tokens(record)
        ids, mask = self.prefix_ids + ids, [False] * self.image_offset + mask
        if len(ids) > self.text_len:
            raise BadRecord(f"record {rid}: {len(ids)} tokens exceed data.text_len {self.text_len}")
        pad = self.text_len - len(ids)
        return {
            "pixels": pixels,
            "input_ids": np.array(ids + [0] * pad, np.int32),
            "text_mask": np.array([True] * len(ids) + [False] * pad),
            "loss_mask": np.array(mask + [False] * pad),
        }
