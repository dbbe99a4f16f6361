"""Skip-FFN train-step benchmark: compiled FLOPs and step time.

1. Skipped share sweep: 0 / 25 / 50 / 75% of the 576 visual tokens skip
   every FFN (no merge, no summaries), against the same model with none skipped.
2. The paper's layout: full (576 tokens) vs merge (100 kept + 476 merged to
   156) vs skip (merge + summary tokens + Skip-FFN).

Each row gives the FLOP-ideal saving (1 - flops / flops_full), the realized
one (1 - ms / ms_full) and their ratio; on accelerators with a known peak,
MFU. The vision tower is replaced by fixed random features of CLIP ViT-L width
(1024): the timings are of projector + merge + decoder + loss + backward +
AdamW, the part Skip-FFN changes.

    python bench/skip_ffn.py [--steps 10] [--batch 4] [--dtype bfloat16]

Prints one JSON line; writes bench/results/<device>/skip_ffn.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from common import (
    DECODER,
    DTYPE,
    VISION_576,
    compiled_flops,
    full_config,
    init_params,
    peak_flops,
    skip_config,
    write_result,
)

from skipvision_jax.config import LayoutConfig, ModelConfig, SkipConfig
from skipvision_jax.flops import train_step_flops
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.train.optim import TRAINABLE_PRESETS
from skipvision_jax.train.step import init_train_state, make_train_step

NUM_KEPT, MERGE_TO, NUM_TEXT = 100, 156, 64
SHARES = (0.0, 0.25, 0.5, 0.75)


def share_config(share: float, dtype: str) -> ModelConfig:
    num_visual = VISION_576.num_features
    kept = num_visual - round(share * num_visual)
    return ModelConfig(
        VISION_576,
        LayoutConfig(num_kept=kept, merge_to=None, summary_tokens=False),
        SkipConfig(enabled=share > 0),
        DECODER,
        dtype=dtype,
    )


def layout_variants(dtype: str) -> dict[str, ModelConfig]:
    full = dataclasses.replace(full_config(VISION_576), dtype=dtype)
    merge = ModelConfig(
        VISION_576,
        LayoutConfig(num_kept=NUM_KEPT, merge_to=MERGE_TO, summary_tokens=False),
        SkipConfig(enabled=False),
        DECODER,
        dtype=dtype,
    )
    return {"full": full, "merge": merge, "skip": skip_config(VISION_576, NUM_KEPT, MERGE_TO, dtype)}


def compiled_step(cfg: ModelConfig, batch_size: int):
    model = SkipVisionVLM(cfg)
    key = jax.random.key(0)
    batch = {
        "input_ids": jax.random.randint(key, (batch_size, NUM_TEXT), 0, cfg.decoder.vocab_size),
        "text_mask": jnp.ones((batch_size, NUM_TEXT), bool),
        "loss_mask": jnp.ones((batch_size, NUM_TEXT), bool),
        "vision_features": jax.random.normal(key, (batch_size, cfg.vision.num_features, cfg.vision.width)),
    }
    optimizer = optax.adamw(1e-4)
    state = init_train_state(init_params(cfg, batch), optimizer, TRAINABLE_PRESETS["all"], seed=0)
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=0).lower(state, batch).compile()
    return step, state, batch, compiled_flops(step)


def time_interleaved(configs: dict[str, ModelConfig], batch_size: int, steps: int) -> dict[str, dict]:
    """Median step ms and compiled FLOPs; variants interleaved so that drift in machine load hits all alike."""
    compiled = {name: compiled_step(cfg, batch_size) for name, cfg in configs.items()}
    states = {name: c[1] for name, c in compiled.items()}
    times = {name: [] for name in compiled}
    for i in range(steps + 2):
        for name, (step, _, batch, _) in compiled.items():
            start = time.perf_counter()
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready(metrics)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {
        name: {
            "flops": compiled[name][3],
            "analytic_flops": train_step_flops(cfg, NUM_TEXT, batch_size),
            "ms": 1000 * statistics.median(times[name]),
        }
        for name, cfg in configs.items()
    }


def savings(rows: dict[str, dict], baseline: str, peak: float | None) -> dict[str, dict]:
    base = rows[baseline]
    for row in rows.values():
        row["ideal_saving"] = 1 - row["flops"] / base["flops"]
        row["realized_saving"] = 1 - row["ms"] / base["ms"]
        row["realized_over_ideal"] = row["realized_saving"] / row["ideal_saving"] if row["ideal_saving"] > 0 else None
        row["mfu"] = row["flops"] / (row["ms"] / 1000) / peak if peak else None
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument(
        "--batch",
        type=int,
        default=4,
        help="examples per step (batch 1 under-fills the CPU matmuls of the short retained slice)",
    )
    parser.add_argument(
        "--dtype", default=DTYPE, choices=("float32", "bfloat16"), help="compute dtype (default: the geometry's)"
    )
    parser.add_argument("--name", default="skip_ffn", help="result file name")
    args = parser.parse_args()
    peak = peak_flops() if args.dtype == "bfloat16" else None
    shares = savings(
        time_interleaved({f"{int(100 * s)}%": share_config(s, args.dtype) for s in SHARES}, args.batch, args.steps),
        "0%",
        peak,
    )
    layout = savings(time_interleaved(layout_variants(args.dtype), args.batch, args.steps), "full", peak)
    d = DECODER
    result = {
        "geometry": {
            "visual_tokens": VISION_576.num_features,
            "kept": NUM_KEPT,
            "merge_to": MERGE_TO,
            "text_tokens": NUM_TEXT,
            "batch": args.batch,
            "width": d.width,
            "layers": d.num_layers,
            "heads": d.num_heads,
            "kv_heads": d.num_kv_heads,
            "mlp_dim": d.mlp_dim,
            "vocab": d.vocab_size,
            "vision": f"fixed random features, {VISION_576.num_features} x {VISION_576.width} (tower not run)",
        },
        "dtype": args.dtype,
        "steps": args.steps,
        "shares": shares,
        "layout": layout,
    }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
