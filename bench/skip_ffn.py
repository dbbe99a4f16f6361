"""Skip-FFN train-step benchmark: full vs merge vs skip at one geometry.

Prints one JSON line. The vision tower is replaced by fixed random features of
CLIP ViT-L width (1024), so the timings are of projector + merge + decoder +
loss + backward + AdamW update, the part Skip-FFN changes.

    python bench/skip_ffn.py [--steps 10] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from skipvision_jax.config import (
    DecoderConfig,
    LayoutConfig,
    ModelConfig,
    SkipConfig,
    VisionConfig,
)
from skipvision_jax.flops import train_step_flops
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.train.optim import TRAINABLE_PRESETS
from skipvision_jax.train.step import init_train_state, make_train_step

# LLaVA-1.5 layout (336 px / 14 = 24 x 24 = 576 visual tokens) with a scaled-down decoder.
VISION = VisionConfig(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096)
DECODER = DecoderConfig(vocab_size=32000, width=512, num_layers=8, num_heads=8, num_kv_heads=2, mlp_dim=1408)
NUM_KEPT, MERGE_TO, NUM_TEXT = 100, 156, 64


def variants() -> dict[str, ModelConfig]:
    build = lambda merge_to, summaries, skip: ModelConfig(VISION, LayoutConfig(num_kept=NUM_KEPT, merge_to=merge_to, summary_tokens=summaries), SkipConfig(enabled=skip), DECODER)
    return {"full": build(None, False, False), "merge": build(MERGE_TO, False, False), "skip": build(MERGE_TO, True, True)}


def compiled_step(cfg: ModelConfig, batch_size: int):
    model = SkipVisionVLM(cfg)
    key = jax.random.key(0)
    batch = {
        "input_ids": jax.random.randint(key, (batch_size, NUM_TEXT), 0, cfg.decoder.vocab_size),
        "text_mask": jnp.ones((batch_size, NUM_TEXT), bool),
        "loss_mask": jnp.ones((batch_size, NUM_TEXT), bool),
        "vision_features": jax.random.normal(key, (batch_size, cfg.vision.num_features, cfg.vision.width)),
    }
    init = jax.jit(lambda k: nn.unbox(model.init(k, batch["input_ids"], batch["text_mask"], vision_features=batch["vision_features"]))["params"])
    optimizer = optax.adamw(1e-4)
    state = init_train_state(init(key), optimizer, TRAINABLE_PRESETS["all"], seed=0)
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=0).lower(state, batch).compile()
    cost = step.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    return step, state, batch, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4, help="examples per step (batch 1 under-fills the CPU matmuls of the short retained slice)")
    args = parser.parse_args()

    compiled = {name: compiled_step(cfg, args.batch) for name, cfg in variants().items()}
    states = {name: c[1] for name, c in compiled.items()}
    times = {name: [] for name in compiled}
    # Interleave the variants so that drift in machine load hits all of them alike.
    for i in range(args.steps + 2):
        for name, (step, _, batch, _) in compiled.items():
            start = time.perf_counter()
            states[name], metrics = step(states[name], batch)
            jax.block_until_ready(metrics)
            if i >= 2:
                times[name].append(time.perf_counter() - start)

    result = {
        "geometry": {
            "visual_tokens": VISION.num_features, "kept": NUM_KEPT, "fine": VISION.num_features - NUM_KEPT, "merge_to": MERGE_TO,
            "text_tokens": NUM_TEXT, "batch": args.batch, "width": DECODER.width, "layers": DECODER.num_layers,
            "heads": DECODER.num_heads, "kv_heads": DECODER.num_kv_heads, "mlp_dim": DECODER.mlp_dim, "vocab": DECODER.vocab_size,
            "vision": f"fixed random features, {VISION.num_features} x {VISION.width} (tower not run)",
        },
        "steps": args.steps,
        "device": jax.devices()[0].device_kind,
    }
    for name, cfg in variants().items():
        result[f"flops_{name}"] = compiled[name][3]
        result[f"analytic_flops_{name}"] = train_step_flops(cfg, NUM_TEXT, args.batch)
        result[f"ms_{name}"] = 1000 * statistics.median(times[name])
    ideal = 1 - result["flops_skip"] / result["flops_full"]
    realized = 1 - result["ms_skip"] / result["ms_full"]
    result["ideal_saving_skip"] = ideal
    result["realized_saving_skip"] = realized
    result["realized_over_ideal"] = realized / ideal
    print(json.dumps(result))


if __name__ == "__main__":
    main()
