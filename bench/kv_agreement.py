"""Greedy answers of every KV policy against `full` on the embedded task's val set.

    python bench/kv_agreement.py --checkpoint DIR [--questions 1000] [--fractions 0.25,0.5]

Prints one JSON line (and writes bench/results/<device>/kv_agreement.json): per policy and budget (a fraction of the full cache),
agreement with `full` (identical answer tokens) and exact-match accuracy.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from common import write_result

from skipvision_jax.data.tasks import generated_task
from skipvision_jax.generate import Generator
from skipvision_jax.inference import load_trained
from skipvision_jax.kvcache import CachePlan, KVPolicy

MAX_NEW = 2  # one answer word and <eos>


def val_source(loaded):
    """The run's validation split (a generated task's)."""
    data = loaded.cfg.data
    return generated_task(data.kind)("val", data.val_size, data.seed, data.text_len)


def val_prompts(loaded, count: int, prompt_len: int):
    source = val_source(loaded)
    ids = np.zeros((count, prompt_len), np.int32)
    mask = np.zeros((count, prompt_len), bool)
    pixels, answers = [], []
    for i in range(count):
        _, _, question, answer, _ = source.sample(i)
        prompt = loaded.text.prompt_ids(question)
        ids[i, : len(prompt)], mask[i, : len(prompt)] = prompt, True
        pixels.append(source[i]["pixels"])
        answers.append(answer)
    return {"input_ids": ids, "text_mask": mask, "pixels": np.stack(pixels)}, answers


def run_policy(loaded, policy: KVPolicy, prompts: dict, batch_size: int) -> np.ndarray:
    generator = Generator(loaded.model_cfg, policy, MAX_NEW, stop_ids=loaded.stop_ids, pad_id=loaded.pad_id)
    out = []
    for start in range(0, len(prompts["input_ids"]), batch_size):
        batch = {k: jnp.asarray(v[start : start + batch_size]) for k, v in prompts.items()}
        out.append(np.asarray(generator(loaded.params, batch).tokens))
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--sink_tokens", type=int, default=1)
    parser.add_argument("--recent_window", type=int, default=4)
    parser.add_argument("--obs_window", type=int, default=3)
    args = parser.parse_args()

    loaded = load_trained(args.checkpoint)
    prompt_len = loaded.cfg.data.text_len - MAX_NEW
    prompts, answers = val_prompts(loaded, min(args.questions, loaded.cfg.data.val_size), prompt_len)
    knobs = dict(sink_tokens=args.sink_tokens, recent_window=args.recent_window, obs_window=args.obs_window)
    base = KVPolicy.of("full")
    full_slots = CachePlan.make(loaded.model_cfg, base, prompt_len, MAX_NEW).buffer_size
    reference = run_policy(loaded, base, prompts, args.batch)

    def score(tokens):
        texts = [loaded.decode(t.tolist()) for t in tokens]
        return {
            "agreement_with_full": float(np.mean(np.all(tokens == reference, axis=1))),
            "exact_match": float(np.mean([t == a for t, a in zip(texts, answers)])),
        }

    results = {"full": {"kv_slots": full_slots, **score(reference)}}
    skip = KVPolicy.of("skip_vision")
    results["skip_vision"] = {
        "kv_slots": CachePlan.make(loaded.model_cfg, skip, prompt_len, MAX_NEW).buffer_size,
        **score(run_policy(loaded, skip, prompts, args.batch)),
    }
    for fraction in map(float, args.fractions.split(",")):
        budget = max(int(round(fraction * full_slots)), 1)
        for name in ("h2o", "snapkv", "streaming"):
            policy = KVPolicy.taking(name, budget, **knobs)
            results[f"{name}@{fraction:g}"] = {
                "kv_slots": budget,
                **score(run_policy(loaded, policy, prompts, args.batch)),
            }
    write_result(
        "kv_agreement",
        {"checkpoint": args.checkpoint, "questions": len(answers), "max_new_tokens": MAX_NEW, "results": results},
    )


if __name__ == "__main__":
    main()
