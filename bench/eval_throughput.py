"""Questions per second of the eval.py harness at batch 1 and batch 16.

    python bench/eval_throughput.py --checkpoint runs/default [--questions 1000] [--batch-sizes 1,16] [--repeats 2]

Exports the embedded validation questions in LLaVA's format, then answers
them all through `evaluate_questions` (what eval.py runs: grain image
pipeline, length buckets, greedy decoding, answers written to disk) once per
batch size and repeat. Compilation is timed apart (`warmup_s`: the first
call of each program); questions/s is over the rest of the wall time. Prints
one JSON line and writes bench/results/<device>/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from common import write_result

from skipvision_jax.data.tasks import export_llava_eval
from skipvision_jax.inference import load_trained
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.vqa import benchmarks, files
from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/default", help="A train.py workdir on the embedded task.")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policy", default="skip_vision")
    args = parser.parse_args()

    loaded = load_trained(args.checkpoint)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_llava_eval(os.path.join(tmp, "export"), "val", args.questions, loaded.cfg.data.seed)
        questions = files.read_questions(exported["questions"])
        annotations = benchmarks.read_annotations(exported["annotations"], "exact")
        for repeat in range(args.repeats):
            for batch_size in batch_sizes:
                answers_path = os.path.join(tmp, f"answers_{batch_size}_{repeat}.jsonl")
                settings = EvalSettings(
                    KVPolicy.of(args.policy), max_new_tokens=4, batch_size=batch_size, progress=False
                )
                summary = evaluate_questions(loaded, questions, exported["images"], answers_path, settings)
                scores = benchmarks.score("exact", files.read_answers(answers_path), annotations)
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


if __name__ == "__main__":
    main()
