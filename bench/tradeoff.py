"""The quality-cost study of Skip-Vision on the detail task.

    python bench/tradeoff.py [--runs runs/tradeoff] [--variants full,skip,...] [--steps 3000] [--questions 500]

Trains each visual-token variant on the detail task (configs/detail.py, same
seed and steps) unless its run is already in `--runs` (a rerun only
re-evaluates; `--variants` runs some at a time), then measures for each,
answered with the full KV cache and (Skip-FFN variants) with skip_vision's:
validation exact match and answer-token accuracy of greedy answers (eval.py's
harness on the exported validation questions), forward FLOPs per example
(the compiled prefill program, batch 1), answer latency (prefill + decode,
batch 1 and 16) and training time. Then, on a Skip-FFN model (`--kv-variant`,
by default skip_nomerge: on this task the merged ones answer at chance, and a
sweep over a model that cannot answer measures nothing), every KV policy
at 25 / 50 / 75% of the full cache: exact match, and agreement with `full`
per answer token. Prints one JSON line and writes
bench/results/<device>/tradeoff.json (figures: python bench/report.py).

    variant       visual tokens in the decoder
    full          all 45 (9 coarse + 36 fine) through every layer
    merge         9 coarse + q1 + 36 fine merged to 12 + q2, no Skip-FFN
    skip          the paper's layout: merge + Skip-FFN + summary tokens
    skip_nomerge  36 fine unmerged, Skip-FFN + summaries
    skip_topk     merge + Skip-FFN whose 9 FFN tokens a router picks
    drop_fine     only the 9 coarse tokens (the fine ones never enter)
    fastv         the full model, pruned after layer 2 (of 4) to the 11 visual
                  tokens its last prompt token attends to most (skip's 9 + 2 summaries)
    fastv_layer1  the same, pruned after layer 1
    skip_cls      the paper's layout, its 9 kept tokens the fine patches the tower's
                  CLS attends most (layout.select=cls_attention; a one-layer tower)
    skip_official, skip_cls_official
                  skip and skip_cls with the official merge and one shared summary
                  pool (the others use ToMe's merge and two pools)
    skip_masked   the paper's layout, text hidden from the skipped rows
                  (skip.text_sees_skipped=False): the skip_vision cache is exact
    skip_nomerge_masked  skip_nomerge, text hidden from the skipped rows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from common import RESULTS, device_slug, write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import detail  # noqa: E402
from skipvision_jax.batching import collate  # noqa: E402
from skipvision_jax.config import FastVConfig  # noqa: E402
from skipvision_jax.data.detail import DetailVQA  # noqa: E402
from skipvision_jax.data.synthetic import chance_accuracy  # noqa: E402
from skipvision_jax.data.tasks import export_llava_eval  # noqa: E402
from skipvision_jax.generate import Generator, Sampling  # noqa: E402
from skipvision_jax.inference import LoadedModel, load_trained, with_model_config  # noqa: E402
from skipvision_jax.kvcache import CachePlan, KVPolicy  # noqa: E402
from skipvision_jax.nn import SkipVisionVLM  # noqa: E402
from skipvision_jax.presses import PRESSES  # noqa: E402
from skipvision_jax.train.loop import train_and_evaluate  # noqa: E402
from skipvision_jax.vqa import files  # noqa: E402
from skipvision_jax.vqa.benchmarks import exact_match  # noqa: E402
from skipvision_jax.vqa.harness import Encoded, EvalSettings, evaluate_questions  # noqa: E402

MAX_NEW = 7  # the answer (6 tokens) and <eos>
# variant -> its FastV pruning, applied to the full run at inference (training-free)
FASTV = {"fastv": FastVConfig(layer=2, keep=11), "fastv_layer1": FastVConfig(layer=1, keep=11)}
# variant -> (config overrides of configs/detail.py, the trained run it uses, the KV caches it is answered with:
# every variant with the full cache, the Skip-FFN ones also with skip_vision's, which drops their skipped tokens)
VARIANTS = {
    "full": (
        {
            "model.skip.enabled": False,
            "model.layout.num_kept": 45,
            "model.layout.merge_to": None,
            "model.layout.summary_tokens": False,
        },
        "full",
        ("full",),
    ),
    "merge": ({"model.skip.enabled": False}, "merge", ("full",)),
    "skip": ({}, "skip", ("full", "skip_vision")),
    "skip_nomerge": ({"model.layout.merge_to": None}, "skip_nomerge", ("full", "skip_vision")),
    # The official LLaVA setting's selection: the 9 kept tokens are the fine
    # patches the CLS token attends most in the tower's one layer (the
    # attention needs a layer, which the other variants' towers do not run);
    # no pooled coarse grid, the other 27 merged to 12.
    "skip_cls": (
        {"model.vision.pooled_grids": (), "model.vision.select_layer": 1, "model.layout.select": "cls_attention"},
        "skip_cls",
        ("full", "skip_vision"),
    ),
    # The same two with the official code's merge and its one shared summary
    # pool (configs/detail.py keeps ToMe and two pools, which its task was tuned with).
    "skip_official": (
        {"model.layout.merge_method": "official", "model.layout.summary_pool": "shared"},
        "skip_official",
        ("full", "skip_vision"),
    ),
    "skip_cls_official": (
        {
            "model.vision.pooled_grids": (),
            "model.vision.select_layer": 1,
            "model.layout.select": "cls_attention",
            "model.layout.merge_method": "official",
            "model.layout.summary_pool": "shared",
        },
        "skip_cls_official",
        ("full", "skip_vision"),
    ),
    # Text hidden from the skipped rows (the older official variants): the skip cache is exact.
    "skip_masked": ({"model.skip.text_sees_skipped": False}, "skip_masked", ("full", "skip_vision")),
    "skip_nomerge_masked": (
        {"model.layout.merge_to": None, "model.skip.text_sees_skipped": False},
        "skip_nomerge_masked",
        ("full", "skip_vision"),
    ),
    "skip_topk": ({"model.skip.partition": "topk"}, "skip_topk", ("full", "skip_vision")),
    "drop_fine": (
        {
            "model.skip.enabled": False,
            "model.layout.merge_to": None,
            "model.layout.summary_tokens": False,
            "model.layout.drop_fine": True,
        },
        "drop_fine",
        ("full",),
    ),
    "fastv": (None, "full", ("full",)),
    "fastv_layer1": (None, "full", ("full",)),
}


def variant_config(name: str, steps: int):
    cfg = detail.get_config()
    cfg.train.steps = steps
    cfg.train.checkpoint_every = steps
    cfg.update_from_flattened_dict(VARIANTS[name][0] or {})
    return cfg


def train(name: str, runs: str, steps: int) -> dict:
    """Trains the variant's run unless it is done; returns {train_s, steps}."""
    run = os.path.join(runs, VARIANTS[name][1])
    record = os.path.join(run, "tradeoff_train.json")
    if os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        if done["steps"] == steps:
            return done
    start = time.perf_counter()
    train_and_evaluate(variant_config(VARIANTS[name][1], steps), run)
    done = {"steps": steps, "train_s": time.perf_counter() - start}
    with open(record, "w") as f:
        json.dump(done, f)
    return done


def answer_token_accuracy(predicted: str, reference: str) -> float:
    """Answer tokens (and the end) right at their place, over the longer of the two."""
    p, r = predicted.split() + ["<eos>"], reference.split() + ["<eos>"]
    return sum(a == b for a, b in zip(p, r)) / max(len(p), len(r))


def evaluate(loaded: LoadedModel, exported: dict, policy: KVPolicy, answers_path: str) -> dict[str, str]:
    """Answers every question afresh: eval.py resumes an answers file, which here may hold an older run's model."""
    if os.path.exists(answers_path):
        os.remove(answers_path)
    settings = EvalSettings(policy, max_new_tokens=MAX_NEW, batch_size=16, progress=False)
    evaluate_questions(loaded, files.read_questions(exported["questions"]), exported["images"], answers_path, settings)
    return {a["question_id"]: a["text"] for a in files.read_answers(answers_path)}


def quality(answers: dict, reference: dict) -> dict[str, float]:
    ids = sorted(reference)
    return {
        "exact_match": float(np.mean([exact_match(answers[i], reference[i]) for i in ids])),
        "token_accuracy": float(np.mean([answer_token_accuracy(answers[i], reference[i]) for i in ids])),
    }


def prefill_flops(loaded: LoadedModel, batch: dict) -> float:
    model = SkipVisionVLM(loaded.model_cfg)
    one = {k: v[:1] for k, v in batch.items()}
    compiled = (
        jax.jit(
            lambda p, b: model.apply(
                {"params": p}, b["input_ids"], b["text_mask"], b["pixels"], method=SkipVisionVLM.prefill
            )
        )
        .lower(loaded.params, one)
        .compile()
    )
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def answer_latency_ms(loaded: LoadedModel, batch: dict, policy: KVPolicy, repeats: int = 31) -> float:
    """Prefill + greedy decode of MAX_NEW tokens (no early stop), median over repeats."""
    generator = Generator(loaded.model_cfg, policy, MAX_NEW, Sampling(), stop_ids=(), pad_id=loaded.pad_id)
    rng = jax.random.key(0)
    jax.block_until_ready(generator(loaded.params, batch, rng).tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(generator(loaded.params, batch, rng).tokens)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def first_batch(loaded: LoadedModel, exported: dict) -> dict:
    """The first 16 validation questions as one batch, padded to the longest."""
    rows = []
    for q in files.read_questions(exported["questions"])[:16]:
        batch, model_cfg = loaded.make_batch(os.path.join(exported["images"], q.image), q.text)
        rows.append(Encoded(q, batch["input_ids"][0], batch["pixels"][0], model_cfg))
    return collate(rows, max(len(r.ids) for r in rows), 16, loaded.pad_id)


def measure(name: str, runs: str, exported: dict, reference: dict, train_record: dict) -> dict[str, dict]:
    """One row per KV cache the variant is answered with: "name" (full cache), "name, policy cache"."""
    loaded = load_trained(os.path.join(runs, VARIANTS[name][1]))
    if name in FASTV:
        loaded = with_model_config(loaded, lambda cfg: dataclasses.replace(cfg, fastv=FASTV[name]))
    batch16 = first_batch(loaded, exported)
    gflops = prefill_flops(loaded, batch16) / 1e9
    rows = {}
    for policy in map(KVPolicy, VARIANTS[name][2]):
        row = name if policy.name == "full" else f"{name}, {policy.name} cache"
        answers = evaluate(loaded, exported, policy, os.path.join(runs, f"answers_{name}_{policy.name}.jsonl"))
        rows[row] = {
            **quality(answers, reference),
            "forward_gflops": gflops,
            "latency_ms_batch1": answer_latency_ms(loaded, {k: v[:1] for k, v in batch16.items()}, policy),
            "latency_ms_batch16": answer_latency_ms(loaded, batch16, policy),
            "kv_slots": CachePlan.make(loaded.model_cfg, policy, batch16["input_ids"].shape[1], MAX_NEW).buffer_size,
            "policy": policy.name,
            **train_record,
        }
    return rows


def agreement(answers: dict, reference_answers: dict) -> float:
    """Mean answer-token accuracy of `answers` against another run's answers to the same questions."""
    return float(np.mean([answer_token_accuracy(answers[i], reference_answers[i]) for i in reference_answers]))


def mean_slots(loaded: LoadedModel, policy: KVPolicy, text_len: int) -> float:
    """Cache slots per layer, the mean over layers (PyramidKV sizes its layers apart)."""
    return float(np.mean(CachePlan.make(loaded.model_cfg, policy, text_len, MAX_NEW).slots))


SWEPT_POLICIES = [name for name, press in PRESSES.items() if not press.fixed]


KV_KNOBS = dict(sink_tokens=2, recent_window=8, obs_window=4)


def least_budget(name: str) -> int:
    """The study's floor: what the press needs under its knobs."""
    return KVPolicy.taking(name, **KV_KNOBS).least_budget(MAX_NEW)


def kv_policies(runs: str, variant: str, exported: dict, reference: dict, text_len: int) -> dict:
    """Every policy on a trained variant at fractions of the full cache, in
    both budget modes: a buffer of that many slots (`name@fraction`, the
    evicting policies evict while decoding) and kvpress's compression ratio
    1 - fraction of each prompt (`name@fraction/ratio`, decoding appends)."""
    loaded = load_trained(os.path.join(runs, VARIANTS[variant][1]))
    full_slots = CachePlan.make(loaded.model_cfg, KVPolicy.of("full"), text_len, MAX_NEW).buffer_size
    base = KVPolicy.of("full")
    full = evaluate(loaded, exported, base, os.path.join(runs, f"answers_kv_{variant}_full.jsonl"))
    rows = {"full": {"kv_slots": full_slots, **quality(full, reference), "token_agreement_with_full": 1.0}}
    skip_policy = KVPolicy.of("skip_vision")
    answers = evaluate(loaded, exported, skip_policy, os.path.join(runs, f"answers_kv_{variant}_skip_vision.jsonl"))
    rows["skip_vision"] = {
        "kv_slots": CachePlan.make(loaded.model_cfg, skip_policy, text_len, MAX_NEW).buffer_size,
        **quality(answers, reference),
        "token_agreement_with_full": agreement(answers, full),
    }
    for fraction in (0.25, 0.5, 0.75):
        budget = max(int(round(fraction * full_slots)), *(least_budget(name) for name in SWEPT_POLICIES))
        ratio = round(1 - fraction, 2)
        for name in SWEPT_POLICIES:
            for row, policy in (
                (f"{name}@{fraction:g}", KVPolicy.taking(name, budget, **KV_KNOBS)),
                (f"{name}@{fraction:g}/ratio", KVPolicy.taking(name, compression=ratio, **KV_KNOBS)),
            ):
                path = os.path.join(runs, f"answers_kv_{variant}_{row.replace('@', '_').replace('/', '_')}.jsonl")
                answers = evaluate(loaded, exported, policy, path)
                rows[row] = {
                    "policy": name,
                    "mode": "ratio" if policy.compression is not None else "budget",
                    "kv_slots": mean_slots(loaded, policy, text_len),
                    "fraction": fraction,
                    **quality(answers, reference),
                    "token_agreement_with_full": agreement(answers, full),
                }
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        default=os.path.join(REPO, "runs", "tradeoff"),
        help="where the variants' runs are kept (reused when done)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--questions", type=int, default=500, help="validation questions answered per variant")
    parser.add_argument("--skip-kv", action="store_true", help="leave out the KV policy sweep")
    parser.add_argument(
        "--kv-variant",
        default="skip_nomerge",
        choices=[name for name, (_, _, policies) in VARIANTS.items() if "skip_vision" in policies],
        help="the Skip-FFN model the KV policies are swept on (trained if its run is missing)",
    )
    args = parser.parse_args()
    names = [name for name in args.variants.split(",") if name]  # --variants "": the KV sweep alone
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: --variants: unknown {unknown}, expected some of {list(VARIANTS)}")
    cfg = detail.get_config()
    exported = export_llava_eval(
        os.path.join(args.runs, "val_export"), "val", args.questions, cfg.data.seed, task="detail"
    )
    reference = {q["question_id"]: q["answer"] for _, q in files.read_jsonl(exported["annotations"], "annotations")}
    result_path = os.path.join(RESULTS, device_slug(), "tradeoff.json")
    previous = json.load(open(result_path)) if os.path.exists(result_path) else {}
    variants = previous.get("variants", {})
    for name in names:
        record = train(name, args.runs, args.steps)
        rows = measure(name, args.runs, exported, reference, record)
        variants.update(rows)
        print(json.dumps(rows), flush=True)
    chance = chance_accuracy(DetailVQA("val", args.questions, cfg.data.seed))
    result = {
        "task": "detail",
        "steps": args.steps,
        "questions": args.questions,
        "chance_exact_match": chance,
        "variants": variants,
        "kv_variant": previous.get("kv_variant"),
        "kv": previous.get("kv"),
    }
    # The sweep of the per-layer caches (one slot set for all KV heads, before
    # per-head selection) stays beside the new one for comparison.
    result["kv_per_layer"] = previous.get("kv_per_layer")
    if not args.skip_kv:
        train(args.kv_variant, args.runs, args.steps)
        result["kv_variant"] = args.kv_variant
        result["kv"] = kv_policies(args.runs, args.kv_variant, exported, reference, cfg.data.text_len)
    write_result("tradeoff", result)


if __name__ == "__main__":
    main()
