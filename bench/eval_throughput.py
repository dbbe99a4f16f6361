"""Questions per second of the eval.py harness at batch 1 and batch 16, and
with several questions per image, prefixes shared or not.

    python bench/eval_throughput.py --checkpoint runs/default [--questions 1000] [--batch-sizes 1,16] [--repeats 2]
    python bench/eval_throughput.py --per-image 1,8,32 [--batch-sizes 16] [--geometry llava]

With `--per-image`, every k consecutive questions of the export ask about
the first one's image (so their answers are not the task's: only the
throughput and the equality of the two modes' answers count), and each batch
size runs with `share_prefix` off and on; `answers_identical` compares them.
With `--geometry llava` the checkpoint gives only its tokenizer and prompts:
the weights are random, at LLaVA-1.5's visual geometry (336 px / 14 = 576
patches, Skip-Vision's 100 kept + 156 merged; a 2-layer width-256 tower, as
bench/vs_transformers.py scales it) and the CPU benchmark decoder, where the
image's prefix is most of the prompt, as in the benchmarks.

Exports the embedded validation questions in LLaVA's format, then answers
them all through `evaluate_questions` (what eval.py runs: grain image
pipeline, length buckets, greedy decoding, answers written to disk) once per
batch size and repeat. Compilation is timed apart (`warmup_s`: the first
call of each program); questions/s is over the rest of the wall time. Prints
one JSON line and writes bench/results/<device>/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
from common import one_image_per, skip_config, write_result

from skipvision_jax.config import ModelConfig, VisionConfig
from skipvision_jax.data.images import preprocess
from skipvision_jax.data.tasks import export_llava_eval
from skipvision_jax.inference import LoadedModel, load_trained
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.vqa import benchmarks, files
from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/default", help="A train.py workdir on the embedded task.")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policy", default="skip_vision")
    parser.add_argument("--per-image", default=None, help="Questions per image, e.g. 1,8,32: the prefix-sharing study.")
    parser.add_argument("--geometry", choices=("checkpoint", "llava"), default="checkpoint")
    args = parser.parse_args()
    loaded = load_trained(args.checkpoint)
    if args.geometry == "llava":
        loaded = at_llava_geometry(loaded)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_llava_eval(os.path.join(tmp, "export"), "val", args.questions, loaded.cfg.data.seed)
        study = per_image_study if args.per_image else batch_study
        study(args, loaded, batch_sizes, exported, tmp)


def at_llava_geometry(loaded: LoadedModel) -> LoadedModel:
    """The checkpoint's prompts and tokenizer, random weights at LLaVA-1.5's visual geometry."""
    tower = VisionConfig(image_size=336, patch_size=14, width=256, depth=2, num_heads=4, mlp_dim=1024)
    base = skip_config(tower, num_kept=100, merge_to=156)
    decoder = dataclasses.replace(base.decoder, vocab_size=loaded.model_cfg.decoder.vocab_size)

    def change(model_cfg: ModelConfig) -> ModelConfig:  # the prompt's own image offset
        return dataclasses.replace(
            base, decoder=decoder, layout=dataclasses.replace(base.layout, image_offset=model_cfg.layout.image_offset)
        )

    def encode(image, turns):
        batch, model_cfg = loaded.encode(image, turns)
        return {**batch, "pixels": preprocess(image, tower.image_size)[None]}, change(model_cfg)

    cfg = change(loaded.model_cfg)
    blank = {"input_ids": jnp.ones((1, 8), jnp.int32), "text_mask": jnp.ones((1, 8), bool)}
    pixels = jnp.zeros((1, tower.image_size, tower.image_size, 3))
    params = jax.jit(lambda key: nn.unbox(SkipVisionVLM(cfg).init(key, **blank, pixels=pixels))["params"])(
        jax.random.key(0)
    )
    return dataclasses.replace(loaded, model_cfg=cfg, params=params, encode=encode)


def batch_study(args, loaded, batch_sizes: list[int], exported: dict, tmp: str) -> None:
    questions = files.read_questions(exported["questions"])
    annotations = benchmarks.read_annotations(exported["annotations"], "exact")
    runs = []
    for repeat in range(args.repeats):
        for batch_size in batch_sizes:
            path = os.path.join(tmp, f"answers_{batch_size}_{repeat}.jsonl")
            summary, lines = answer_all(loaded, questions, exported["images"], path, args.policy, batch_size)
            scores = benchmarks.score("exact", lines, annotations)
            runs.append(
                {
                    "batch_size": batch_size,
                    "repeat": repeat,
                    "exact_match": scores["accuracy"],
                    **{k: summary[k] for k in ("answered", "warmup_s", "answer_s", "questions_per_s")},
                }
            )
    median_qps = {b: statistics.median(r["questions_per_s"] for r in runs if r["batch_size"] == b) for b in batch_sizes}
    result = {
        "checkpoint": args.checkpoint,
        "policy": args.policy,
        "questions": args.questions,
        "runs": runs,
        "median_questions_per_s": median_qps,
    }
    if len(batch_sizes) >= 2:
        result["speedup_largest_over_smallest"] = median_qps[max(batch_sizes)] / median_qps[min(batch_sizes)]
    write_result("eval_throughput", result)


def answer_all(loaded, questions, images: str, path: str, policy: str, batch_size: int, share_prefix: bool = True):
    """eval.py's harness on every question, greedy answers of 4 tokens: its summary and its answer lines."""
    settings = EvalSettings(
        KVPolicy.of(policy), max_new_tokens=4, batch_size=batch_size, progress=False, share_prefix=share_prefix
    )
    summary = evaluate_questions(loaded, questions, images, path, settings)
    return summary, files.read_answers(path)


def per_image_study(args, loaded, batch_sizes: list[int], exported: dict, tmp: str) -> None:
    questions = files.read_questions(exported["questions"])
    rows = []
    for per_image in (int(k) for k in args.per_image.split(",")):
        asked = one_image_per(questions, per_image)
        for batch_size in batch_sizes:
            measured, timings = {}, {}
            for repeat in range(args.repeats):
                for share in (False, True):
                    path = os.path.join(tmp, f"answers_{per_image}_{batch_size}_{share}_{repeat}.jsonl")
                    summary, lines = answer_all(loaded, asked, exported["images"], path, args.policy, batch_size, share)
                    answers = {a["question_id"]: a["text"] for a in lines}
                    batches = {
                        a["metadata"]["prefill_ms"]: a["metadata"] for a in lines
                    }.values()  # a batch: one timing
                    measured.setdefault(share, []).append((summary["questions_per_s"], answers))
                    timings.setdefault(share, []).extend(batches)
            qps = {share: statistics.median(q for q, _ in runs) for share, runs in measured.items()}
            ms = {
                (share, key): statistics.median(b[key] for b in batches)
                for share, batches in timings.items()
                for key in ("prefill_ms", "decode_ms")
            }
            rows.append(
                {
                    "per_image": per_image,
                    "batch_size": batch_size,
                    "questions_per_s_unshared": qps[False],
                    "questions_per_s_shared": qps[True],
                    "speedup": qps[True] / qps[False],
                    # Per batch, medians: what sharing can shorten (prefill) and what it cannot (decode).
                    "prefill_ms_unshared": ms[False, "prefill_ms"],
                    "prefill_ms_shared": ms[True, "prefill_ms"],
                    "decode_ms": ms[False, "decode_ms"],
                    "batch_ms_unshared": 1000 * batch_size / qps[False],
                    "answers_identical": all(
                        shared == unshared
                        for (_, shared), (_, unshared) in zip(measured[True], measured[False], strict=True)
                    ),
                }
            )
    result = {
        "checkpoint": args.checkpoint,
        "geometry": args.geometry,
        "policy": args.policy,
        "questions": args.questions,
        "rows": rows,
    }
    write_result("eval_throughput_per_image" + ("_llava" if args.geometry == "llava" else ""), result)


if __name__ == "__main__":
    main()
