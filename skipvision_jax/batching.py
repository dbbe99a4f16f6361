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


def length_buckets(max_text_len: int, shortest_prompt: int = 1) -> tuple[int, ...]:
    """The text lengths prompts are padded to: powers of two from the first
    that holds the shortest possible prompt, closed by `max_text_len`."""
    smallest = SMALLEST_BUCKET
    while smallest < shortest_prompt:
        smallest *= 2
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


def share_prefixes(
    batch: dict[str, np.ndarray], text_before_image: int, sizes: tuple[int, ...], real_rows: int | None = None
) -> dict:
    """The batch with the rows that share a prefix (their image and their text
    before it) marked for one prefill of it: `prefix_rows` [U], a row holding
    each distinct prefix (U padded to the next of `sizes` by repeating the
    first), and `prefix_index` [B], each row's. Unchanged when no two of the
    first `real_rows` share one (the rest, `collate`'s copies of the first,
    alone would only add a program)."""
    image = batch["pixels"] if "pixels" in batch else batch["vision_features"]
    text_mask = batch["text_mask"]
    distinct: dict[tuple, int] = {}
    prefix_index = []
    for row in range(len(image)):
        whole = bool(text_mask[row, :text_before_image].all())  # a prefix with padding is its row's own
        key = (image[row].tobytes(), batch["input_ids"][row, :text_before_image].tobytes()) if whole else (row,)
        prefix_index.append(distinct.setdefault(key, row))
    prefix_rows = list(dict.fromkeys(prefix_index))
    real = prefix_index[: len(prefix_index) if real_rows is None else real_rows]
    if len(set(real)) == len(real):
        return batch
    size = next((s for s in sizes if s >= len(prefix_rows)), len(prefix_rows))
    position = {row: i for i, row in enumerate(prefix_rows)}
    return {
        **batch,
        "prefix_rows": np.array(prefix_rows + [prefix_rows[0]] * (size - len(prefix_rows)), np.int32),
        "prefix_index": np.array([position[row] for row in prefix_index], np.int32),
    }
