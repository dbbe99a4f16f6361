"""Size a real configuration on a simulated mesh, from abstract shapes only.

    python bench/scale.py --config configs/skipvision_llama3_8b.py --devices 8 --mesh 1,8,1 [--batch 8]

No weight is allocated: the train state is planned with `jax.eval_shape` and
the train step (full and skip), prefill and decode step are lowered and
compiled for N fake CPU devices (`--xla_force_host_platform_device_count`).
For each it prints, per device, `compiled.memory_analysis()` (arguments,
outputs, temporaries, total), the collectives in the optimized HLO (count and
bytes of all-gather, reduce-scatter, all-reduce), the compile time, and the
train step's analytic FLOPs (decoder, from skipvision_jax.flops, plus the
frozen tower's forward); the analytic decoder count is checked against the
compiled FLOPs of a 2-layer unrolled cut (XLA counts a scanned body once).
Then a projected step time and tokens/s per chip at `--mfu` on each chip of
CHIPS, and whether the per-device bytes fit its HBM. One JSON line; written
to bench/results/scale/<config>_<devices>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time

# Chips to size against: dense bf16 peak FLOP/s and HBM bytes per chip.
# TPU v5p: cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GB);
# TPU v5e: cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB);
# H100 SXM: nvidia.com/en-us/data-center/h100 (989 TFLOP/s dense bf16, 80 GB).
CHIPS = {"tpu_v5p": (459e12, 95e9), "tpu_v5e": (197e12, 16e9), "h100_sxm": (989e12, 80e9)}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a configs/*.py experiment file")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the rest)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: one example per device)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilization assumed for the projection")
    parser.add_argument("--skip-decode", action="store_true", help="size the train steps only")
    return parser.parse_args()


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def collectives(hlo: str) -> dict[str, dict[str, float]]:
    """Count and result bytes of each collective in optimized HLO text."""
    out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s(all-gather|reduce-scatter|all-reduce)(?:-start)?\(", line)
        if not match:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
        size = 0
        for dtype, dims in shapes:
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            size += count * DTYPE_BYTES.get(dtype, 4)
        out[match.group(2)]["count"] += 1
        out[match.group(2)]["bytes"] += size
    return out


def memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    parts = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
    }
    parts["total"] = parts["arguments"] + parts["outputs"] + parts["temporaries"] - stats.alias_size_in_bytes
    return parts


def main():
    args = parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, REPO)
    import dataclasses
    import json

    import jax
    import jax.numpy as jnp

    from skipvision_jax import sharding
    from skipvision_jax.config import LayoutConfig, SkipConfig
    from skipvision_jax.experiment import sizing_model_config
    from skipvision_jax.flops import train_step_flops, vision_forward_flops
    from skipvision_jax.generate import Generator
    from skipvision_jax.kvcache import KVPolicy
    from skipvision_jax.nn import attention
    from skipvision_jax.nn.shapes import abstract_params
    from skipvision_jax.train.state import build_state_plan
    from skipvision_jax.train.step import make_train_step

    # The programs sized here run on accelerators: whole-sequence attention, not the CPU's query blocks.
    attention.CPU_QUERY_BLOCK = None

    cfg = load_config(args.config)
    mesh_sizes = dict(zip(sharding.MESH_AXES, (int(x) for x in args.mesh.split(","))))
    mesh = sharding.make_mesh(mesh_sizes)
    rules = sharding.logical_rules(cfg.mesh)
    batch = args.batch or args.devices
    text_len = cfg.data.text_len
    skip_cfg = sizing_model_config(cfg)
    full_cfg = dataclasses.replace(
        skip_cfg,
        layout=LayoutConfig.plain(skip_cfg.vision.num_features, skip_cfg.layout.image_offset),
        skip=SkipConfig(enabled=False),
    )
    v = skip_cfg.vision
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.rows_sharding(mesh, shape))
    train_batch = {
        "input_ids": rows((batch, text_len), jnp.int32),
        "text_mask": rows((batch, text_len), jnp.bool_),
        "loss_mask": rows((batch, text_len), jnp.bool_),
        "pixels": rows((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),
    }
    result = {
        "config": os.path.basename(args.config),
        "devices": args.devices,
        "mesh": dict(mesh.shape),
        "batch": batch,
        "text_len": text_len,
        "mfu": args.mfu,
    }

    def compile_timed(lower):
        start = time.perf_counter()
        compiled = lower().compile()
        return compiled, time.perf_counter() - start

    for name, model_cfg in (("full", full_cfg), ("skip", skip_cfg)):
        model, optimizer, plan = build_state_plan(cfg, model_cfg, mesh, rules)
        step = jax.jit(
            make_train_step(model, optimizer),
            out_shardings=(plan.shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        with sharding.activate(mesh, rules):
            compiled, seconds = compile_timed(lambda step=step, plan=plan: step.lower(plan.abstract, train_batch))
        decoder_flops = train_step_flops(model_cfg, text_len, batch, v.width)
        tower_flops = batch * vision_forward_flops(v)
        step_flops = decoder_flops + tower_flops
        sequence = model.layout(text_len).length
        per_device = memory(compiled)
        projected = {}
        for chip, (peak, hbm) in CHIPS.items():
            seconds_per_step = step_flops / args.devices / (peak * args.mfu)
            projected[chip] = {
                "step_s": seconds_per_step,
                "tokens_per_s_per_chip": batch * sequence / seconds_per_step / args.devices,
                "fits_hbm": per_device["total"] <= hbm,
            }
        result[f"train_{name}"] = {
            "per_device_bytes": per_device,
            "collectives": collectives(compiled.as_text()),
            "compile_s": seconds,
            "analytic_flops": step_flops,
            "analytic_decoder_flops": decoder_flops,
            "tower_forward_flops": tower_flops,
            "sequence": sequence,
            "projected": projected,
        }
        print(
            json.dumps({f"train_{name}": result[f"train_{name}"]["per_device_bytes"], "compile_s": seconds}), flush=True
        )

    # Analytic decoder FLOPs against the compiler's, on a 2-layer unrolled cut
    # fed precomputed vision features (no tower), no remat.
    cut = dataclasses.replace(
        skip_cfg,
        decoder=dataclasses.replace(skip_cfg.decoder, num_layers=2),
        layout=dataclasses.replace(skip_cfg.layout, select="first"),  # fed features: no tower attention to rank by
        scan_layers=False,
        remat=False,
    )
    model, optimizer, plan = build_state_plan(cfg, cut, mesh, rules)
    cut_batch = {**train_batch, "vision_features": rows((batch, v.num_features, v.width), jnp.float32)}
    del cut_batch["pixels"]
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=0)
    with sharding.activate(mesh, rules):
        cost = step.lower(plan.abstract, cut_batch).compile().cost_analysis()
    compiled_flops = float((cost[0] if isinstance(cost, list) else cost)["flops"]) * args.devices
    analytic = train_step_flops(cut, text_len, batch, v.width)
    result["flops_check_2_layers"] = {
        "compiled": compiled_flops,
        "analytic": analytic,
        "analytic_over_compiled": analytic / compiled_flops,
    }

    if not args.skip_decode:
        inference_cfg = dataclasses.replace(skip_cfg, remat=False)  # scanned layers, as trained
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
            abstract_params(inference_cfg, mesh, rules),
        )
        prompt = {k: train_batch[k] for k in ("input_ids", "text_mask", "pixels")}
        generator = Generator(inference_cfg, KVPolicy.of("skip_vision"), 16, mesh=mesh, rules=rules)
        rng = jax.random.key(0)
        with sharding.activate(mesh, rules):
            prefill, prefill_s = compile_timed(lambda: generator._prefill_jit.lower(params, prompt, rng))
            state = jax.eval_shape(generator._prefill, params, prompt, rng)
            state = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, prefill.output_shardings
            )
            decode, decode_s = compile_timed(lambda: generator._decode_jit.lower(params, state))
        result["prefill_skip"] = {
            "per_device_bytes": memory(prefill),
            "collectives": collectives(prefill.as_text()),
            "compile_s": prefill_s,
        }
        result["decode_skip"] = {
            "per_device_bytes": memory(decode),
            "collectives": collectives(decode.as_text()),
            "compile_s": decode_s,
        }

    folder = os.path.join(HERE, "results", "scale")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.config))[0]
    with open(os.path.join(folder, f"{stem}_{args.devices}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
