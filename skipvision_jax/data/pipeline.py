"""grain pipelines: the embedded task or LLaVA-format data, split by process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grain
import numpy as np

from skipvision_jax.data.llava import BadRecord, LlavaSource, LlavaTransform
from skipvision_jax.data.synthetic import chance_accuracy
from skipvision_jax.data.tasks import generated_task

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


class DataSpec:
    """The sources, transform and tokenizer of one experiment's data config (`cfg.data`).

    `encode_prompt(text)` gives the text ids of a question (the image goes after
    the first `image_offset` of them), `decode(ids)` the answer text."""

    def __init__(self, data_cfg, image_size: int):
        self.cfg = data_cfg
        if data_cfg.kind in ("synthetic", "detail"):
            task = generated_task(data_cfg.kind)
            self.train_source = task(
                "train", data_cfg.train_size, data_cfg.seed, data_cfg.text_len, data_cfg.get("train_kind_weights", ())
            )
            self.val_source = task("val", data_cfg.val_size, data_cfg.seed, data_cfg.text_len)
            self.transform = None
            # A generated example is 0.3 ms of NumPy under the GIL: grain's
            # default 16 reader threads only contend for it (65 ms a batch of
            # 64 against 26 ms read inline, measured on 2 cores).
            self._read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            self.image_offset = task.image_offset
            self.vocab_size = len(task.tokenizer)
            self.question_kinds = task.kinds
            self.chance_exact_match = chance_accuracy(self.val_source)
            tok = task.tokenizer
            self.encode_prompt = lambda text: [tok.bos_id] + tok.encode(text)
            self.decode = tok.decode
            self.stop_ids, self.pad_id = (tok.eos_id,), tok.pad_id
        elif data_cfg.kind == "llava":
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(data_cfg.tokenizer)
            except Exception as err:  # tokenizers raises a bare Exception on a bad file
                raise ValueError(f"data.tokenizer: cannot load {data_cfg.tokenizer!r} ({err})") from None
            self.train_source = LlavaSource(data_cfg.json_path, data_cfg.on_bad_record)
            self.val_source = (
                LlavaSource(data_cfg.val_json_path, data_cfg.on_bad_record) if data_cfg.val_json_path else None
            )
            self.transform = SkipBadRecords(
                LlavaTransform(tokenizer, data_cfg.image_dir, image_size, data_cfg.text_len),
                strict=data_cfg.on_bad_record == "raise",
            )
            # Decoding image files is I/O and C code: grain's default reader threads overlap it.
            self._read_options = grain.ReadOptions()
            self.image_offset = self.transform.transform.image_offset
            self.vocab_size = tokenizer.get_vocab_size()
            self.question_kinds = ()
            self.chance_exact_match = None
            transform = self.transform.transform
            self.encode_prompt = transform.prompt_ids
            self.decode = lambda ids: tokenizer.decode([i for i in ids if i != transform.eos_id])
            self.stop_ids, self.pad_id = (transform.eos_id,), 0
            if len(self.train_source) == 0:
                raise ValueError(f"data.json_path: no usable record in {data_cfg.json_path}")
        else:
            raise ValueError(f"data.kind: unknown {data_cfg.kind!r}, expected 'synthetic', 'detail' or 'llava'")

    @property
    def skipped_records(self) -> int:
        malformed = len(getattr(self.train_source, "skipped", []))
        return malformed + (self.transform.skipped if self.transform else 0)

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
