"""The quality-cost study on easy-VQA, a public VQA set nobody here made,
through LLaVA's path (configs/easy_vqa.py: a BPE tokenizer, vicuna_v1).

    pip install easy-vqa && python -m skipvision_jax.data.easy_vqa --export data/easy_vqa
    python bench/easy_vqa_study.py [--data data/easy_vqa] [--runs runs/easy_vqa_study] [--variants skip,full,...]

Trains each variant (same seed, steps and data) unless its run is in
`--runs`, then answers the whole test split (9,673 questions) greedily with
eval.py's harness and scores it per question type (shape, color, yes/no):

    variant       visual tokens in the decoder (64 patches of 8 pixels)
    skip          the paper's layout: 16 kept by the class token's attention,
                  48 merged to 12 by the official merge, one summary pool,
                  Skip-FFN in every layer (configs/easy_vqa.py as it is)
    full          all 64 through every layer (plain LLaVA)
    skip_nomerge  the same 16 kept, the 48 others unmerged, Skip-FFN + summaries
    drop_fine     only the 16 kept (the others never enter)
    fastv         the full model, pruned after layer 2 (of 4) to the 30
                  visual tokens its last prompt token attends to most (as
                  many as skip's rows: 16 + 12 + 2 summaries), training-free

For each: test exact match (all and per type), forward FLOPs per question
(the compiled prefill, batch 1) and training wall time. Prints one JSON line
and writes bench/results/<device>/easy_vqa_study.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from common import write_result
from tradeoff import prefill_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import easy_vqa  # noqa: E402
from skipvision_jax.config import FastVConfig  # noqa: E402
from skipvision_jax.inference import load_trained, with_model_config  # noqa: E402
from skipvision_jax.kvcache import KVPolicy  # noqa: E402
from skipvision_jax.train.loop import train_and_evaluate  # noqa: E402
from skipvision_jax.vqa import files  # noqa: E402
from skipvision_jax.vqa.benchmarks import read_annotations, score  # noqa: E402
from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions  # noqa: E402

MAX_NEW = 4  # one-word answers and their end
PLAIN = {"model.layout.select": "first", "model.layout.merge_to": None, "model.layout.summary_tokens": False}
# variant -> (overrides of configs/easy_vqa.py, the run it uses, its FastV pruning at inference)
VARIANTS = {
    "skip": ({}, "skip", None),
    "full": ({**PLAIN, "model.layout.num_kept": 64, "model.skip.enabled": False}, "full", None),
    "skip_nomerge": ({"model.layout.merge_to": None}, "skip_nomerge", None),
    "drop_fine": (
        {
            "model.layout.merge_to": None,
            "model.layout.summary_tokens": False,
            "model.layout.drop_fine": True,
            "model.skip.enabled": False,
        },
        "drop_fine",
        None,
    ),
    "fastv": (None, "full", FastVConfig(layer=2, keep=30)),
}


def variant_config(name: str, data: str, steps: int | None):
    cfg = easy_vqa.get_config(data)
    if steps:
        cfg.train.steps = steps
    cfg.update_from_flattened_dict(VARIANTS[name][0] or {})
    return cfg


def train(name: str, data: str, runs: str, steps: int | None) -> dict:
    """Trains the variant's run unless it is done; returns {train_s, steps, last validation metrics}."""
    run = os.path.join(runs, VARIANTS[name][1])
    record = os.path.join(run, "study_train.json")
    cfg = variant_config(VARIANTS[name][1], data, steps)
    if os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        if done["steps"] == cfg.train.steps:
            return done
    start = time.perf_counter()
    last = train_and_evaluate(cfg, run)
    done = {"steps": cfg.train.steps, "train_s": time.perf_counter() - start}
    done.update({k: v for k, v in last.items() if k.startswith("val_")})
    with open(record, "w") as f:
        json.dump(done, f)
    return done


def measure(name: str, data: str, runs: str, trained: dict) -> dict:
    loaded = load_trained(os.path.join(runs, VARIANTS[name][1]))
    if VARIANTS[name][2] is not None:
        loaded = with_model_config(loaded, lambda cfg: dataclasses.replace(cfg, fastv=VARIANTS[name][2]))
    questions = files.read_questions(os.path.join(data, "questions.jsonl"))
    answers = os.path.join(runs, f"answers_{name}.jsonl")
    if os.path.exists(answers):  # answer afresh: the file may hold an older run's answers
        os.remove(answers)
    settings = EvalSettings(KVPolicy.of("full"), MAX_NEW, batch_size=32, progress=False)
    start = time.perf_counter()
    evaluate_questions(loaded, questions, os.path.join(data, "images"), answers, settings)
    answer_s = time.perf_counter() - start
    truth = read_annotations(os.path.join(data, "annotations.jsonl"), "exact")
    categories = {q.question_id: q.category for q in questions}
    scores = score("exact", files.read_answers(answers), truth, categories=categories)
    q = questions[0]
    batch, _ = loaded.make_batch(os.path.join(data, "images", q.image), q.text)
    return {
        "test_exact_match": scores["accuracy"],
        "by_type": {c: v["accuracy"] for c, v in scores["by_category"].items()},
        "questions": len(questions),
        "forward_gflops": prefill_flops(loaded, batch) / 1e9,
        "answer_s": answer_s,
        **trained,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "data", "easy_vqa"), help="the export's directory")
    parser.add_argument("--runs", default=os.path.join(REPO, "runs", "easy_vqa_study"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
    args = parser.parse_args()
    rows = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"--variants: unknown {name!r}, expected some of {tuple(VARIANTS)}")
        trained = train(name if VARIANTS[name][0] is not None else "full", args.data, args.runs, args.steps or None)
        rows[name] = measure(name, args.data, args.runs, trained)
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    result = {"data": "easy-VQA test split", "variants": rows}
    print(json.dumps(result))
    write_result("easy_vqa_study", result)


if __name__ == "__main__":
    main()
