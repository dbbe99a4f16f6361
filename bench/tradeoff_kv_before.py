"""The study's KV sweep as an older checkout computes it, on the same trained
model and scored as bench/tradeoff.py scores now (plain exact match), stored
beside the current sweep as `kv_per_layer` in bench/results/<device>/tradeoff.json.

    PYTHONPATH=/path/to/checkout/of/7f2be9c python bench/tradeoff_kv_before.py [--runs runs/tradeoff]

7f2be9c is the last commit whose caches kept one slot set per layer for all
KV heads (h2o, snapkv, streaming). It uses only what that checkout has: the
package under PYTHONPATH answers, this script scores. Run bench/tradeoff.py
first (it trains the skip_nomerge model and exports the questions).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import skipvision_jax
from skipvision_jax.inference import load_trained
from skipvision_jax.kvcache import CachePlan, KVPolicy
from skipvision_jax.vqa import files
from skipvision_jax.vqa.harness import EvalSettings, evaluate_questions

BENCH = os.path.dirname(os.path.abspath(__file__))
MAX_NEW, TEXT_LEN = 7, 15  # tradeoff.py's answer length and configs/detail.py's text_len


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=os.path.join(os.path.dirname(BENCH), "runs", "tradeoff"))
    args = parser.parse_args()
    loaded = load_trained(os.path.join(args.runs, "skip_nomerge"))
    export = os.path.join(args.runs, "val_export")
    questions = files.read_questions(os.path.join(export, "questions.jsonl"))
    truth = {q["question_id"]: q["answer"] for _, q in files.read_jsonl(os.path.join(export, "annotations.jsonl"), "a")}

    def answer(policy: KVPolicy, name: str) -> dict:
        path = os.path.join(args.runs, f"answers_before_{name}.jsonl")
        if os.path.exists(path):
            os.remove(path)
        settings = EvalSettings(policy, max_new_tokens=MAX_NEW, batch_size=16, progress=False)
        evaluate_questions(loaded, questions, os.path.join(export, "images"), path, settings)
        return {a["question_id"]: a["text"] for a in files.read_answers(path)}

    def token_agreement(predicted: dict, reference: dict) -> float:
        scores = []
        for i in reference:
            p, r = predicted[i].split() + ["<eos>"], reference[i].split() + ["<eos>"]
            scores.append(sum(a == b for a, b in zip(p, r)) / max(len(p), len(r)))
        return float(np.mean(scores))

    def exact(predicted: dict) -> float:
        return float(np.mean([predicted[i].lower().split() == truth[i].lower().split() for i in truth]))

    base = KVPolicy.of("full")
    knobs = dict(sink_tokens=2, recent_window=8, obs_window=4)  # tradeoff.py's settings
    full_slots = CachePlan.make(loaded.model_cfg, base, TEXT_LEN, MAX_NEW).buffer_size
    full = answer(base, "full")
    rows = {
        "full": {"kv_slots": full_slots, "exact_match": exact(full), "token_accuracy": token_agreement(full, truth)}
    }
    for fraction in (0.25, 0.5, 0.75):
        budget = max(
            int(round(fraction * full_slots)),
            knobs["sink_tokens"] + knobs["recent_window"] + 1,
            knobs["obs_window"] + MAX_NEW,
        )
        for name in ("h2o", "snapkv", "streaming"):
            predicted = answer(KVPolicy.taking(name, budget, **knobs), f"{name}_{fraction}")
            rows[f"{name}@{fraction:g}"] = {
                "policy": name,
                "mode": "budget",
                "kv_slots": budget,
                "fraction": fraction,
                "exact_match": exact(predicted),
                "token_accuracy": token_agreement(predicted, truth),
                "token_agreement_with_full": token_agreement(predicted, full),
            }
    path = os.path.join(BENCH, "results", "cpu", "tradeoff.json")
    result = json.load(open(path))
    result["kv_per_layer"] = {"package": os.path.dirname(skipvision_jax.__file__), **rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
