"""Static shapes for prompts of every length, shared by eval.py's harness and
the server's scheduler: a prompt is padded to the smallest length bucket that
holds it, and prompts go to the model in a few batch sizes, so each (bucket,
size) compiles once."""

from __future__ import annotations

from typing import Protocol

import numpy as np

SMALLEST_BUCKET = 8


def powers_of_two(limit: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from `smallest` below `limit`, closed by `limit` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (limit,)


def length_buckets(max_text_len: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """The text lengths prompts are padded to."""
    return powers_of_two(max_text_len, smallest)


def prefill_sizes(max_prefill: int) -> tuple[int, ...]:
    """Prompts prefilled together: a few programs per bucket, at most half of
    a prefill wasted on padding rows."""
    return powers_of_two(max_prefill)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= length)


class Prompt(Protocol):
    ids: np.ndarray  # [T] text ids
    pixels: np.ndarray  # [H, W, C]


def collate(rows: list[Prompt], bucket: int, batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """[batch_size, bucket] right-padded ids and mask, stacked pixels; rows
    past len(rows) repeat the first one."""
    filled = rows + [rows[0]] * (batch_size - len(rows))
    input_ids = np.full((batch_size, bucket), pad_id, np.int32)
    text_mask = np.zeros((batch_size, bucket), bool)
    for i, row in enumerate(filled):
        input_ids[i, : len(row.ids)] = row.ids
        text_mask[i, : len(row.ids)] = True
    return {"input_ids": input_ids, "text_mask": text_mask, "pixels": np.stack([row.pixels for row in filled])}
