"""The batched evaluation harness: questions in, one answer line each out.

Questions are encoded (image read and preprocessed, prompt tokenized) in a
grain pipeline with worker threads while the device decodes. Prompts are
right-padded to a few static length buckets and batches are always full
(short ones are topped up with copies of their first row, whose answers are
dropped), so a question file compiles one prefill and one decode program per
bucket it uses, never one per question. Answers are appended and flushed a
batch at a time: a run that dies loses the batch in flight, and a rerun on the
same answers file answers only what is missing.
"""

from __future__ import annotations

import dataclasses
import os
import time

import grain
import jax
import numpy as np
import tqdm

from skipvision_jax.batching import bucket_for, collate, prefill_sizes, share_prefixes
from skipvision_jax.config import ModelConfig
from skipvision_jax.data.images import ImageError
from skipvision_jax.errors import one_line
from skipvision_jax.generate import Generator
from skipvision_jax.inference import LoadedModel, answer_text, model_generator
from skipvision_jax.kvcache import CachePlan, KVPolicy, cache_slots
from skipvision_jax.vqa.files import AnswerWriter, Question, answer_id, answered_keys


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One question ready to batch, or the reason it cannot be answered."""

    question: Question
    ids: np.ndarray | None = None  # [T] text ids
    pixels: np.ndarray | None = None  # [H, W, C]
    model_cfg: ModelConfig | None = None  # its layout (where the image sits)
    error: str | None = None


class QuestionEncoder:
    """grain map: Question -> Encoded. A missing or corrupt image, or a prompt
    the model cannot take, becomes an `error` (answered as such, counted)."""

    def __init__(self, loaded: LoadedModel, image_folder: str):
        self.loaded, self.image_folder = loaded, image_folder

    def __call__(self, question: Question) -> Encoded:
        try:
            batch, model_cfg = self.loaded.make_batch(os.path.join(self.image_folder, question.image), question.text)
        except (ImageError, ValueError) as err:  # HFCheckpointError is a ValueError
            return Encoded(question, error=one_line(err))
        return Encoded(question, np.asarray(batch["input_ids"][0]), np.asarray(batch["pixels"][0]), model_cfg)


@dataclasses.dataclass
class EvalSettings:
    policy: KVPolicy
    max_new_tokens: int = 16
    batch_size: int = 16
    model_id: str = "skipvision_jax"
    # grain threads that read and preprocess images; 0: half the cores (they
    # share the host with XLA's own threads: on 2 cores, 8 threads ran 25% slower than 1)
    workers: int = 0
    # pruning policies without a budget or ratio get `KVPolicy.with_default_budget` per bucket
    default_budgets: bool = False
    progress: bool = True
    share_prefix: bool = True  # rows of a batch on one image prefill its prefix once (`batching.share_prefixes`)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if self.workers < 0:
            raise ValueError(f"--workers: must be >= 0, got {self.workers}")
        self.workers = self.workers or max(1, min(8, (os.cpu_count() or 2) // 2))


class Answerer:
    """Generators by (layout, bucket), each program warmed up once on its
    first batch (prefill and decode for each count of shared prefixes;
    `warmup_s` adds up those calls), then timed batch by batch."""

    def __init__(self, loaded: LoadedModel, settings: EvalSettings):
        self.loaded, self.settings = loaded, settings
        self.buckets = loaded.length_buckets()
        self._generators: dict[tuple[ModelConfig, int], Generator] = {}
        self._warm: set[tuple[ModelConfig, int, int]] = set()
        self.warmup_s = 0.0
        self.rng = jax.random.key(0)  # greedy: unused, but prefill takes one

    def policy_for(self, model_cfg: ModelConfig, bucket: int) -> KVPolicy:
        policy, s = self.settings.policy, self.settings
        return policy.with_default_budget(model_cfg, bucket, s.max_new_tokens) if s.default_budgets else policy

    def check_budget(self) -> None:
        """An impossible policy/budget fails before any question is read."""
        cfg, bucket = self.loaded.model_cfg, self.buckets[0]
        CachePlan.make(cfg, self.policy_for(cfg, bucket), bucket, self.settings.max_new_tokens)

    def generator(self, model_cfg: ModelConfig, bucket: int, batch: dict) -> Generator:
        s, loaded = self.settings, self.loaded
        key = (model_cfg, bucket)
        if key not in self._generators:
            self._generators[key] = model_generator(
                loaded, model_cfg, self.policy_for(model_cfg, bucket), s.max_new_tokens
            )
        generator = self._generators[key]
        program = (*key, len(batch.get("prefix_rows", ())))  # 0: no prefix shared
        if program not in self._warm:
            start = time.perf_counter()
            jax.block_until_ready(generator(loaded.params, batch, self.rng).tokens)
            self.warmup_s += time.perf_counter() - start
            self._warm.add(program)
        return generator

    def __call__(self, rows: list[Encoded], bucket: int) -> list[dict]:
        s, loaded = self.settings, self.loaded
        batch = collate(rows, bucket, s.batch_size, loaded.pad_id)
        model_cfg = rows[0].model_cfg
        if s.share_prefix and model_cfg.shares_prefixes:
            batch = share_prefixes(batch, model_cfg.layout.image_offset, prefill_sizes(s.batch_size), len(rows))
        generator = self.generator(model_cfg, bucket, batch)
        start = time.perf_counter()
        state = jax.block_until_ready(generator.prefill(loaded.params, batch, self.rng))
        prefill_s = time.perf_counter() - start
        state = jax.block_until_ready(generator.decode(loaded.params, state))
        decode_s = time.perf_counter() - start - prefill_s
        tokens, steps = np.asarray(state.tokens), int(state.step)
        metadata = {
            "policy": generator.policy.name,
            "kv_slots": cache_slots(state.caches),
            "batch_size": s.batch_size,
            "bucket": bucket,
            # prefills of a visual block, padding included
            "prefixes": len(batch.get("prefix_rows", batch["input_ids"])),
            "prefill_ms": 1000 * prefill_s,
            "decode_ms": 1000 * decode_s,
            "ms_per_answer": 1000 * (prefill_s + decode_s) / len(rows),
        }
        return [
            answer_line(row.question, answer_text(loaded, tokens[i, :steps]), s.model_id, metadata)
            for i, row in enumerate(rows)
        ]


def answer_line(question: Question, text: str, model_id: str, metadata: dict, error: str | None = None) -> dict:
    line = {
        "question_id": question.question_id,
        "prompt": question.text,
        "text": text,
        "answer_id": answer_id(model_id, question, metadata["policy"]),
        "model_id": model_id,
        "metadata": metadata,
    }
    if error is not None:
        line["error"] = error
    return line


def evaluate_questions(
    loaded: LoadedModel, questions: list[Question], image_folder: str, answers_file: str, settings: EvalSettings
) -> dict:
    """Answers every question of `questions` not yet in `answers_file`.
    Returns counts and timings: answered, errors, warmup_s (compiling, one
    untimed batch per program), answer_s (the wall time without it),
    questions_per_s."""
    answerer = Answerer(loaded, settings)
    answerer.check_budget()
    done = answered_keys(answers_file)
    pending = [q for q in questions if q.key not in done]
    encoded = grain.MapDataset.source(pending).map(QuestionEncoder(loaded, image_folder))
    stream = encoded.to_iter_dataset(
        grain.ReadOptions(
            num_threads=settings.workers, prefetch_buffer_size=max(4 * settings.batch_size, settings.workers)
        )
    )
    waiting: dict[tuple[ModelConfig, int], list[Encoded]] = {}
    counts = {"questions": len(questions), "resumed": len(questions) - len(pending), "answered": 0, "errors": 0}
    progress = tqdm.tqdm(
        total=len(questions),
        initial=counts["resumed"],
        unit="q",
        desc=settings.policy.name,
        disable=not settings.progress,
        mininterval=1.0,
    )
    start = time.perf_counter()
    try:
        with AnswerWriter(answers_file) as writer:

            def answer(rows: list[Encoded], bucket: int) -> None:
                writer.write(answerer(rows, bucket))
                counts["answered"] += len(rows)
                progress.update(len(rows))

            for example in stream:
                if example.error is not None:
                    writer.write(
                        [
                            answer_line(
                                example.question, "", settings.model_id, {"policy": settings.policy.name}, example.error
                            )
                        ]
                    )
                    counts["errors"] += 1
                    progress.update(1)
                    continue
                bucket = bucket_for(len(example.ids), answerer.buckets)
                rows = waiting.setdefault((example.model_cfg, bucket), [])
                rows.append(example)
                if len(rows) == settings.batch_size:
                    answer(rows, bucket)
                    rows.clear()
            for (_, bucket), rows in waiting.items():
                if rows:
                    answer(rows, bucket)
    finally:
        progress.close()
    answer_s = max(time.perf_counter() - start - answerer.warmup_s, 1e-9)
    return {
        **counts,
        "warmup_s": answerer.warmup_s,
        "answer_s": answer_s,
        "questions_per_s": counts["answered"] / answer_s,
    }
