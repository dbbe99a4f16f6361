"""grain pipelines: the embedded task or LLaVA-format data, split by process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grain
import numpy as np

from skipvision_jax.data.llava import BadRecord, LlavaSource, LlavaTransform
from skipvision_jax.data.synthetic import chance_accuracy
from skipvision_jax.data.tasks import generated_task
from skipvision_jax.data.templates import DEFAULT_TEMPLATE, ConversationCodec, template_named

log = logging.getLogger(__name__)


class SkipBadRecords:
    """Wraps a transform: a BadRecord becomes None (filtered out and counted) or,
    with `strict`, stops the run with the record's one-line message."""

    def __init__(self, transform: Callable, strict: bool):
        self.transform, self.strict, self.skipped = transform, strict, 0

    def __call__(self, record):
        try:
            return self.transform(record)
        except BadRecord as err:
            if self.strict:
                raise
            self.skipped += 1
            log.warning("skipping %s", err)
            return None


def conversation_lengths(codec: ConversationCodec, *sources) -> dict[str, int]:
    """Tokens of every well-formed conversation of `sources` (record id -> length);
    a conversation the template cannot tokenize is left out (it is skipped when read)."""
    lengths = {}
    for source in sources:
        for record in source or ():
            try:
                lengths[record["id"]] = len(codec.example([turn["value"] for turn in record["conversations"]])[0])
            except ValueError:
                continue
    return lengths


class TaskFormat:
    """The generated tasks' text: `<bos> question answer <eos>` in their word
    tokenizer, the image after `<bos>`. Answers the same questions as
    `templates.ConversationCodec` does for LLaVA-format runs (the run's text
    format, all that inference needs)."""

    def __init__(self, task):
        tok = task.tokenizer
        self.image_offset, self.vocab_size = task.image_offset, len(tok)
        self.stop_ids, self.pad_id = (tok.eos_id,), tok.pad_id
        self.decode = tok.decode
        self.prompt_ids = lambda text: [tok.bos_id] + tok.encode(text)


def text_format(data_cfg, tokenizer_path: str | None = None):
    """A run's text format: its generated task's, or its tokenizer (a
    tokenizer.json: `tokenizer_path`, default `data.tokenizer`) under its
    template (`data.template`)."""
    if data_cfg.kind in ("synthetic", "detail"):
        return TaskFormat(generated_task(data_cfg.kind))
    if data_cfg.kind != "llava":
        raise ValueError(f"data.kind: unknown {data_cfg.kind!r}, expected 'synthetic', 'detail' or 'llava'")
    from tokenizers import Tokenizer

    path = tokenizer_path or data_cfg.tokenizer
    if not path:
        raise ValueError("data.tokenizer: LLaVA-format data needs a tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"data.tokenizer: cannot load {path!r} ({err})") from None
    return ConversationCodec(tokenizer, template_named(data_cfg.get("template", DEFAULT_TEMPLATE)))


class DataSpec:
    """The sources and transform of one experiment's data config (`cfg.data`),
    in its text format (`text_format`).

    LLaVA-format data validates on `data.val_json_path`, or else on
    `data.val_size` records (at most `data.val_fraction` of them) held back from
    `data.json_path`. `text_len` is `data.text_len`, or, when that is 0, the
    longest conversation's tokens (LLaVA-format) or the task's own length."""

    def __init__(self, data_cfg, text, image_size: int):
        self.cfg, self.text = data_cfg, text
        self.truncated_at_start = 0
        if data_cfg.kind in ("synthetic", "detail"):
            task = generated_task(data_cfg.kind)
            self.text_len = data_cfg.text_len or task.text_len
            self.train_source = task(
                "train", data_cfg.train_size, data_cfg.seed, self.text_len, data_cfg.get("train_kind_weights", ())
            )
            self.val_source = task("val", data_cfg.val_size, data_cfg.seed, self.text_len)
            self.transform = None
            # A generated example is 0.3 ms of NumPy under the GIL: grain's
            # default 16 reader threads only contend for it (65 ms a batch of
            # 64 against 26 ms read inline, measured on 2 cores).
            self._read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            self.question_kinds = task.kinds
            self.chance_exact_match = chance_accuracy(self.val_source)
            return
        self.train_source = LlavaSource(data_cfg.json_path, data_cfg.on_bad_record)
        if data_cfg.val_json_path:
            self.val_source = LlavaSource(data_cfg.val_json_path, data_cfg.on_bad_record, "data.val_json_path")
        else:
            held = min(data_cfg.val_size, int(len(self.train_source) * data_cfg.get("val_fraction", 0.0)))
            self.train_source, self.val_source = self.train_source.held_out(held, data_cfg.seed)
            self.val_source = self.val_source if held else None
        if len(self.train_source) == 0:
            raise ValueError(f"data.json_path: no usable record in {data_cfg.json_path}")
        lengths = conversation_lengths(text, self.train_source, self.val_source)
        self.text_len = data_cfg.text_len or max(lengths.values(), default=1)
        self.truncated_at_start = sum(length > self.text_len for length in lengths.values())
        self.transform = SkipBadRecords(
            LlavaTransform(text, data_cfg.image_dir, image_size, self.text_len),
            strict=data_cfg.on_bad_record == "raise",
        )
        # Decoding image files is I/O and C code: grain's default reader threads overlap it.
        self._read_options = grain.ReadOptions()
        self.question_kinds = ()
        self.chance_exact_match = None

    @property
    def skipped_records(self) -> int:
        malformed = len(getattr(self.train_source, "skipped", []))
        return malformed + (self.transform.skipped if self.transform else 0)

    @property
    def truncated_records(self) -> int:
        """Conversations cut at `text_len` as they were read (LLaVA-format)."""
        return self.transform.transform.truncated if self.transform else 0

    def _mapped(self, dataset: grain.MapDataset) -> grain.MapDataset:
        if self.transform is None:
            return dataset
        return dataset.map(self.transform).filter(lambda example: example is not None)

    def train_iterator(
        self, global_batch: int, seed: int, rows: tuple[int, int] | None = None
    ) -> grain.DatasetIterator:
        """Endless shuffled batches; checkpointable (`get_state`/`set_state`).

        One global order for any number of processes: each process reads only
        its `rows` [start, stop) of every global batch (see
        `sharding.process_rows`), so the global batches, and the training run,
        do not depend on how many processes assemble them."""
        start, stop = rows or (0, global_batch)
        # shuffle-then-repeat: each epoch is a fresh permutation.
        ordered = grain.MapDataset.source(self.train_source).shuffle(seed=seed).repeat(None)
        local = stop - start
        own_rows = grain.MapDataset.range(len(ordered) // global_batch * local).map(
            lambda i: ordered[(i // local) * global_batch + start + i % local]
        )
        batches = self._mapped(own_rows).to_iter_dataset(self._read_options).batch(local, drop_remainder=True)
        # One thread assembles the next batches while the device runs the step
        # (XLA releases the GIL); grain checkpoints the position behind it.
        return iter(grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2))

    def val_batches(
        self, global_batch: int, max_batches: int | None = None, rows: tuple[int, int] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The validation set in order, this process's `rows` of each global
        batch; the last batch is padded with examples that have no answer
        tokens (they count for nothing)."""
        if self.val_source is None:
            return
        start, stop = rows or (0, global_batch)
        dataset = self._mapped(grain.MapDataset.source(self.val_source))
        for i, batch in enumerate(dataset.to_iter_dataset().batch(global_batch)):
            if max_batches is not None and i >= max_batches:
                return
            short = global_batch - len(batch["input_ids"])
            if short:
                batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            yield {k: v[start:stop] for k, v in batch.items()}
