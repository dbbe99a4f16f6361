"""Decoding benchmark: prefill latency, per-token decode latency and cache
bytes for every KV policy, against a memory-bandwidth roofline.

Decoding reads every weight and every cache slot once per step, so its floor
is (weight bytes + KV bytes read) / read bandwidth, or at larger batches the
step's compiled FLOPs / matmul throughput, whichever is longer; both roofs
are measured in the same run (a jitted reduction over 1 GiB, a 2048^3 matmul). Random weights, fixed
random vision features (tower not run), no stop token: every run generates
exactly `--new-tokens`.

1. 576 visual tokens (LLaVA-1.5), batch 1: the full path (plain model, full
   cache) against the skip path (100 kept + 476 merged to 156, summary tokens,
   Skip-FFN prefill, `skip_vision` cache), end to end (prefill + answer); and
   every policy of the skip model at 25% and 50% of the full cache.
2. 1296 visual tokens (16 + 256 + 1024, 272 kept): prefill FLOPs of the full
   model, of Skip-FFN alone and of Skip-FFN with the 1024 fine tokens merged to 256.
3. The same layout at batch 16, Skip-FFN model without merging (the cache of
   1346 slots outweighs the weights): per-token decode of every policy.

    python bench/decode.py [--new-tokens 16] [--repeats 3]

Prints one JSON line; writes bench/results/<device>/decode.json.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from common import (
    VISION_576,
    VISION_1296,
    compiled_flops,
    copy_bandwidth,
    full_config,
    inference_params,
    init_params,
    matmul_flops,
    median_ms,
    read_bandwidth,
    skip_config,
    write_result,
)

from skipvision_jax.config import ModelConfig
from skipvision_jax.generate import Generator
from skipvision_jax.kvcache import CachePlan, KVPolicy, cache_bytes, cache_slots

PROMPT_TEXT = 32


def make_inputs(cfg: ModelConfig, batch: int) -> dict:
    key = jax.random.key(1)
    return {
        "input_ids": jax.random.randint(key, (batch, PROMPT_TEXT), 3, cfg.decoder.vocab_size),
        "text_mask": jnp.ones((batch, PROMPT_TEXT), bool),
        "vision_features": jax.random.normal(key, (batch, cfg.vision.num_features, cfg.vision.width)),
    }


def decode_weight_bytes(params: dict) -> int:
    """What one decode step reads: the decoder layers, the final norm and the LM head (one embedding row is negligible)."""
    read = {k: v for k, v in params.items() if k in ("decoder", "final_norm", "lm_head")}
    if "lm_head" not in params:  # tied: the embedding table is the head
        read["embed"] = params["embed"]
    return sum(x.nbytes for x in jax.tree.leaves(read))


@dataclasses.dataclass(frozen=True)
class Roofs:
    bandwidth: float  # bytes/s read, measured
    flops: float  # FLOP/s of a large matmul, measured


def matvec_floor_ms(params: dict, batch: int, repeats: int) -> float:
    """The decode step's weight products alone (every decoder and LM-head
    kernel times a [batch, in] activation): how close this backend's matrix-
    vector products come to the bandwidth roofline, attention and cache aside."""
    kernels = [k for k in jax.tree.leaves({n: params[n] for n in ("decoder", "lm_head") if n in params}) if k.ndim >= 2]
    # o_proj kernels are [heads, head_dim, out]: their input is the first two dims.
    matrices = [
        k.reshape(-1, k.shape[-1])
        if k.ndim == 3 and k.shape[-1] == params["final_norm"]["scale"].shape[0]
        else k.reshape(k.shape[0], -1)
        for k in kernels
    ]
    x = jnp.ones((batch, max(m.shape[0] for m in matrices)))
    products = jax.jit(lambda x, ms: sum(jnp.sum(x[:, : m.shape[0]] @ m) for m in ms))
    return median_ms(lambda: products(x, matrices), repeats * 5)


def measure(
    cfg: ModelConfig,
    params: dict,
    inputs: dict,
    policy: KVPolicy,
    new_tokens: int,
    repeats: int,
    roof: Roofs,
    time_prefill: bool = True,
) -> dict:
    """One policy; `time_prefill=False` runs the prefill once, untimed (large batches)."""
    generator = Generator(cfg, policy, new_tokens)
    rng = jax.random.key(0)
    prefill = generator._prefill_jit.lower(params, inputs, rng).compile()
    prefill_ms = median_ms(lambda: prefill(params, inputs, rng), repeats) if time_prefill else None
    state = prefill(params, inputs, rng)
    fresh_states = iter([jax.tree.map(jnp.copy, state) for _ in range(repeats + 1)])  # decode donates its input state
    decode_ms = median_ms(lambda: generator.decode(params, next(fresh_states)), repeats)
    per_token_ms = decode_ms / (new_tokens - 1)
    kv = cache_bytes(state.caches)
    step_flops = compiled_flops(jax.jit(generator._decode_step).lower(params, state).compile())
    # The step cannot beat reading its bytes nor doing its FLOPs (at larger
    # batches a CPU runs out of compute before bandwidth).
    memory_ms, compute_ms = 1000 * (decode_weight_bytes(params) + kv) / roof.bandwidth, 1000 * step_flops / roof.flops
    roofline_ms = max(memory_ms, compute_ms)
    return {
        "policy": policy.name,
        "budget": policy.budget,
        "kv_slots": cache_slots(state.caches),
        "kv_bytes": kv,
        "prefill_ms": prefill_ms,
        "prefill_flops": compiled_flops(prefill),
        "decode_ms_per_token": per_token_ms,
        "answer_ms": prefill_ms + decode_ms if time_prefill else None,
        "decode_step_flops": step_flops,
        "memory_roofline_ms": memory_ms,
        "compute_roofline_ms": compute_ms,
        "roofline_ms_per_token": roofline_ms,
        "measured_over_roofline": per_token_ms / roofline_ms,
    }


def pruning_policies(full_slots: int, new_tokens: int) -> list[KVPolicy]:
    out = [KVPolicy.of("full"), KVPolicy.of("skip_vision")]
    for fraction in (0.25, 0.5):
        budget = max(int(fraction * full_slots), 4 + 16 + 1)
        out += [KVPolicy.of("h2o", budget), KVPolicy.of("snapkv", budget), KVPolicy.of("streaming", budget)]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-large", type=int, default=16, help="batch of part 3")
    parser.add_argument("--name", default="decode", help="result file name")
    parser.add_argument("--gib", type=float, default=1.0, help="buffer of the bandwidth measurements")
    args = parser.parse_args()
    # The memory roof: the faster of a reduction (reads only) and a copy (read +
    # write); on a GPU the copy is the figure HBM is quoted by.
    read, copied = read_bandwidth(args.gib), copy_bandwidth(args.gib)
    roof = Roofs(max(read, copied), matmul_flops())
    result = {
        "read_bandwidth_gb_s": roof.bandwidth / 1e9,
        "reduction_bandwidth_gb_s": read / 1e9,
        "copy_bandwidth_gb_s": copied / 1e9,
        "matmul_gflops": roof.flops / 1e9,
        "new_tokens": args.new_tokens,
        "prompt_text_tokens": PROMPT_TEXT,
    }

    # 1. 576 tokens, batch 1
    full_cfg, skip_cfg = full_config(VISION_576), skip_config(VISION_576, 100, 156)
    inputs = make_inputs(full_cfg, 1)
    full_params, skip_params = (inference_params(init_params(cfg, inputs)) for cfg in (full_cfg, skip_cfg))
    full_path = measure(full_cfg, full_params, inputs, KVPolicy.of("full"), args.new_tokens, args.repeats, roof)
    full_slots = CachePlan.make(skip_cfg, KVPolicy.of("full"), PROMPT_TEXT, args.new_tokens).buffer_size
    policies = [
        measure(skip_cfg, skip_params, inputs, p, args.new_tokens, args.repeats, roof)
        for p in pruning_policies(full_slots, args.new_tokens)
    ]
    skip_path = next(row for row in policies if row["policy"] == "skip_vision")
    result["llava576_batch1"] = {
        "weight_bytes_read_per_token": decode_weight_bytes(skip_params),
        "matvec_floor_ms_per_token": matvec_floor_ms(skip_params, 1, args.repeats),
        "full_path": full_path,
        "skip_path": skip_path,
        "answer_latency_saving": 1 - skip_path["answer_ms"] / full_path["answer_ms"],
        "skip_model_policies": policies,
    }

    # 2. 1296 tokens: prefill FLOPs
    configs_1296 = {
        "full": full_config(VISION_1296),
        "skip": skip_config(VISION_1296, 272, None),
        "skip_merge256": skip_config(VISION_1296, 272, 256),
    }
    inputs = make_inputs(configs_1296["full"], 1)
    prefill_flops = {}
    for name, cfg in configs_1296.items():
        params = jax.eval_shape(lambda c=cfg: init_params(c, inputs))
        generator = Generator(cfg, KVPolicy.of("skip_vision" if name != "full" else "full"), args.new_tokens)
        prefill_flops[name] = compiled_flops(generator._prefill_jit.lower(params, inputs, jax.random.key(0)).compile())
    result["layout1296_prefill_flops"] = {
        **prefill_flops,
        **{f"saving_{k}": 1 - v / prefill_flops["full"] for k, v in prefill_flops.items() if k != "full"},
    }

    # 3. 1296 tokens, large batch: per-token decode of every policy
    cfg = configs_1296["skip"]
    inputs = make_inputs(cfg, args.batch_large)
    params = inference_params(init_params(cfg, inputs))
    full_slots = CachePlan.make(cfg, KVPolicy.of("full"), PROMPT_TEXT, args.new_tokens).buffer_size
    budget = full_slots // 2
    rows = [
        measure(cfg, params, inputs, p, args.new_tokens, args.repeats, roof, time_prefill=False)
        for p in (
            KVPolicy.of("full"),
            KVPolicy.of("skip_vision"),
            KVPolicy.of("h2o", budget),
            KVPolicy.of("snapkv", budget),
            KVPolicy.of("streaming", budget),
        )
    ]
    by_name = {row["policy"]: row for row in rows}
    result["layout1296_batch"] = {
        "batch": args.batch_large,
        "weight_bytes_read_per_token": decode_weight_bytes(params),
        "matvec_floor_ms_per_token": matvec_floor_ms(params, args.batch_large, args.repeats),
        "policies": rows,
        "skip_vision_decode_saving": 1
        - by_name["skip_vision"]["decode_ms_per_token"] / by_name["full"]["decode_ms_per_token"],
        "worst_measured_over_roofline": max(row["measured_over_roofline"] for row in rows),
    }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
