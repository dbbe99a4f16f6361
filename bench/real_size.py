"""At the size users run, on this machine: LLaVA-1.5-7B (CLIP ViT-L/14-336,
Vicuna-7B) and the paper's LLaMA-3-8B setting (CLIP ViT-L/14-336,
LLaMA-3-8B), random weights in bfloat16, written and read back through both
checkpoint layouts.

    python bench/real_size.py [--models llava15_7b,llama3_8b] [--scratch DIR] [--layers N] [--no-peer]

Per model, each step in a process of its own (its peak RSS is its own):

1. `write`: random bf16 weights in transformers' LLaVA layout (2 GiB
   safetensors shards), one tensor at a time.
2. `ours`, transformers' layout: load time and peak RSS (against the
   parameters' bytes + 2.5 GB), beside the files' read rate measured right
   after; then, on the plain layout, prefill (576 visual + 64 text tokens)
   and 32 decoded tokens at batch 1 and 4, decode ms/token against the memory
   roofline (bytes read per token over the read bandwidth measured in the same
   process), and the cache bytes of full, skip_vision and snapkv at 0.5;
   then the Skip-Vision layout on the same weights (the official LLaVA
   setting: the 100 tokens the class token attends most kept, 476 merged to
   156, one summary pool, every layer Skip-FFN; the pool's weights random):
   prefill FLOPs and time, and Skip-FFN's realized share of its FLOP-ideal
   saving; the Skip-Vision model exported to LLaVA's own layout.
3. `ours`, LLaVA's layout: load time and peak RSS of that export.
4. `peer`: transformers' LlavaForConditionalGeneration in bf16 on the same
   files (sdpa attention): prefill, decode ms/token, peak RSS.

`--layers N` keeps N decoder layers (tests/test_real_size.py runs it at 2
layers). Prints one JSON line; writes bench/results/<device>/real_size.json
(`real_size_<N>layers.json` with `--layers N`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_TOKENS = 64  # the prompt's text, the image after its first IMAGE_OFFSET tokens
IMAGE_OFFSET = 35  # LLaVA-1.5's vicuna_v1 prompt before the image, in LLaMA's tokenizer
NEW_TOKENS = 32

CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "model_type": "clip_vision_model",
}
# transformers' LLaVA configs as llava-hf's checkpoints have them (the image
# token's id just past the language model's own vocabulary).
MODELS = {
    "llava15_7b": {
        "text": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32064,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
        },
        "image_token_index": 32000,
    },
    "llama3_8b": {
        "text": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128320,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192,
        },
        "image_token_index": 128256,
    },
}


def hf_config(name: str, layers: int | None) -> dict:
    spec = MODELS[name]
    text = {**spec["text"], **({"num_hidden_layers": layers} if layers else {})}
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": CLIP_L_336,
        "text_config": text,
        "image_token_index": spec["image_token_index"],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def files_of(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))


def read_rate(directory: str) -> float:
    """Bytes/s of reading the checkpoint's files in 64 MiB pieces (the page
    cache as it stands: the load before read them the same way)."""
    buffer = bytearray(64 * 2**20)
    total, start = 0, time.perf_counter()
    for path in files_of(directory):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total / (time.perf_counter() - start)


# ---------------------------------------------------------------- 1. write


class RandomWeight:
    """A weight made when numpy asks for it (`np.asarray`), so that the writer
    holds one tensor at a time: N(0, 0.02) in bfloat16, norms near 1."""

    def __init__(self, shape, dtype, seed: int, is_norm: bool):
        self.shape, self.dtype, self.seed, self.is_norm = shape, dtype, seed, is_norm

    def __array__(self, dtype=None, copy=None):
        rng = np.random.default_rng(self.seed)
        value = rng.standard_normal(self.shape, dtype=np.float32) * 0.02 + (1.0 if self.is_norm else 0.0)
        return value.astype(self.dtype)


def write(name: str, directory: str, layers: int | None) -> dict:
    from flax import traverse_util

    from skipvision_jax.interop import hf_llava
    from skipvision_jax.nn.shapes import abstract_params

    config = hf_config(name, layers)
    cfg = dataclasses.replace(hf_llava.model_config_from_hf(config), param_dtype="bfloat16")
    flat = traverse_util.flatten_dict(abstract_params(cfg, None), sep="/")
    lazy = {
        path: RandomWeight(leaf.shape, leaf.dtype, seed, "norm" in path or path.endswith("scale"))
        for seed, (path, leaf) in enumerate(sorted(flat.items()))
    }
    start = time.perf_counter()
    hf_llava.save(directory, traverse_util.unflatten_dict(lazy, sep="/"), cfg, config["image_token_index"], config)
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(p) for p in files_of(directory))
    return {"write_s": seconds, "file_bytes": size, "params": int(sum(np.prod(v.shape) for v in flat.values()))}


# ---------------------------------------------------------------- 2, 3. ours


def prompt(cfg, batch: int) -> dict:
    rng = np.random.default_rng(1)
    size = cfg.vision.image_size
    return {
        "input_ids": rng.integers(3, 32000, (batch, TEXT_TOKENS)).astype(np.int32),
        "text_mask": np.ones((batch, TEXT_TOKENS), bool),
        "pixels": rng.standard_normal((batch, size, size, 3)).astype(np.float32),
    }


def timed(fn):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def generation(cfg, params, batch: int, repeats: int, decode: bool = True) -> dict:
    """Prefill and `NEW_TOKENS` decoded tokens under the full cache. The first
    call of each program compiles and runs it; then each is timed `repeats`
    times (median), and its compile time is the first call's less that."""
    import jax

    from skipvision_jax.generate import Generator
    from skipvision_jax.kvcache import KVPolicy, cache_bytes

    generator = Generator(cfg, KVPolicy.of("full"), NEW_TOKENS)
    inputs, rng = prompt(cfg, batch), jax.random.key(0)
    state, first_prefill = timed(lambda: generator.prefill(params, inputs, rng))
    kv = cache_bytes(state.caches)
    first_decode = timed(lambda: generator.decode(params, state))[1] if decode else 0.0
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        state, seconds = timed(lambda: generator.prefill(params, inputs, rng))
        prefill_s.append(seconds)
        if decode:
            decode_s.append(timed(lambda state=state: generator.decode(params, state))[1])
    prefill, decoded = float(np.median(prefill_s)), float(np.median(decode_s)) if decode else 0.0
    row = {
        "batch": batch,
        "compile_s": first_prefill - prefill + first_decode - decoded,
        "prefill_ms": 1000 * prefill,
        "kv_bytes": kv,
    }
    return row | ({"decode_ms_per_token": 1000 * decoded / (NEW_TOKENS - 1)} if decode else {})


def decode_weight_bytes(params: dict) -> int:
    """What one decode step reads: the decoder layers, the final norm and the LM head."""
    import jax

    return sum(x.nbytes for name in ("decoder", "final_norm", "lm_head") for x in jax.tree.leaves(params[name]))


def with_summary_pool(params: dict, width: int, dtype) -> dict:
    """`params` plus a random summary pool (the official model's `ada`), which a plain LLaVA lacks."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from skipvision_jax.nn.projector import SummaryPool
    from skipvision_jax.nn.shapes import held_in

    pool = nn.unbox(SummaryPool().init(jax.random.key(7), jnp.zeros((1, 4, width)))["params"])
    return {**params, "visual_tokens": {**params["visual_tokens"], "summary": held_in(pool, dtype)}}


def ours(directory: str, export_to: str | None, repeats: int, batches: tuple[int, ...]) -> dict:
    import jax

    sys.path.insert(0, HERE)
    from common import read_bandwidth

    from skipvision_jax.config import OFFICIAL_LLAVA_LAYOUT, LayoutConfig, SkipConfig
    from skipvision_jax.flops import forward_flops, vision_forward_flops
    from skipvision_jax.interop import hf_model, llava_layout
    from skipvision_jax.kvcache import CachePlan, KVPolicy

    start = time.perf_counter()
    hf = hf_model.load(directory)
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss_gb()
    params, cfg = hf.params, hf.model_cfg
    leaves = jax.tree.leaves(params)
    param_bytes = sum(x.nbytes for x in leaves)
    result = {
        "load_s": load_s,
        "read_gb_s": read_rate(directory) / 1e9,
        "param_dtypes": sorted({str(x.dtype) for x in leaves}),
        "param_bytes": param_bytes,
        "peak_rss_after_load_gb": rss_after_load,
        "rss_limit_gb": (1.15 * param_bytes + 2.5e9) / 1e9,
    }
    result["load_gb_s"] = result["param_bytes"] / load_s / 1e9
    if export_to is None:  # reading back the export: the load is what is measured
        return result
    cfg = dataclasses.replace(cfg, layout=dataclasses.replace(cfg.layout, image_offset=IMAGE_OFFSET))
    bandwidth = read_bandwidth(1.0)
    result["memory_read_gb_s"] = bandwidth / 1e9
    result["decode_weight_bytes"] = decode_weight_bytes(params)
    plain = [generation(cfg, params, batch, repeats) for batch in batches]
    for row in plain:
        row["roofline_ms_per_token"] = 1000 * (result["decode_weight_bytes"] + row["kv_bytes"]) / bandwidth
        row["over_roofline"] = row["decode_ms_per_token"] / row["roofline_ms_per_token"]
    result["plain"] = plain
    skip_cfg = dataclasses.replace(
        cfg, layout=LayoutConfig(image_offset=IMAGE_OFFSET, **OFFICIAL_LLAVA_LAYOUT), skip=SkipConfig()
    )
    result["cache_bytes"] = {
        name: cache_plan_bytes(CachePlan.make(model, KVPolicy.of(*policy), TEXT_TOKENS, NEW_TOKENS), model)
        for name, model, policy in (
            ("full", cfg, ("full",)),
            ("skip_vision", skip_cfg, ("skip_vision",)),
            ("snapkv@0.5", cfg, ("snapkv", None, 0.5)),
        )
    }
    skip_params = with_summary_pool(params, cfg.decoder.width, cfg.param_dtype)
    skip = generation(skip_cfg, skip_params, 1, repeats, decode=False)  # its prefill is what is compared
    tower = vision_forward_flops(cfg.vision)  # in both: the prefill times include the tower
    flops = {
        name: tower + sum(forward_flops(model, TEXT_TOKENS, 1).values())
        for name, model in (("plain", cfg), ("skip", skip_cfg))
    }
    ideal = 1 - flops["skip"] / flops["plain"]
    realized = 1 - skip["prefill_ms"] / plain[0]["prefill_ms"]
    result["skip"] = {**skip, "prefill_flops": flops["skip"], "plain_prefill_flops": flops["plain"]}
    result["skip"].update(flop_ideal_saving=ideal, realized_saving=realized, realized_share=realized / ideal)
    start = time.perf_counter()
    llava_layout.save(export_to, skip_params, skip_cfg)
    result["export_llava_s"] = time.perf_counter() - start
    return result


def cache_plan_bytes(plan, cfg) -> int:
    """K and V bytes of every layer's buffer under a plan, one prompt."""
    import jax.numpy as jnp

    d = cfg.decoder
    return int(sum(plan.slots) * 2 * d.num_kv_heads * d.resolved_head_dim * jnp.dtype(cfg.dtype).itemsize)


# ---------------------------------------------------------------- 4. peer


def peer(directory: str, new_tokens: int) -> dict:
    """transformers' bf16 LLaVA on the same files (sdpa attention), batch 1:
    one greedy `generate` of `new_tokens` tokens on the same prompt as ours,
    timed token by token (a logits processor notes when each step's logits
    come), so prefill and decode come from the one call; a short text-only
    `generate` warms it up first."""
    import torch
    from transformers import LlavaForConditionalGeneration

    start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="sdpa")
    load_s = time.perf_counter() - start
    rss = peak_rss_gb()
    config = model.config
    rng = np.random.default_rng(1)
    num_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = rng.integers(3, 32000, TEXT_TOKENS)
    ids = np.concatenate([text[:IMAGE_OFFSET], [config.image_token_index] * num_image, text[IMAGE_OFFSET:]])
    size = config.vision_config.image_size
    pixels = torch.tensor(rng.standard_normal((1, 3, size, size)), dtype=torch.bfloat16)
    stamps: list[float] = []

    def note_time(input_ids, scores):
        stamps.append(time.perf_counter())
        return scores

    def generate(token_ids: np.ndarray, tokens: int, **image) -> float:
        stamps.clear()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=torch.tensor(token_ids[None]),
                attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                logits_processor=[note_time],
                **image,
            )
        return start

    generate(text, 2)
    start = generate(ids, new_tokens, pixel_values=pixels)
    return {
        "load_s": load_s,
        "peak_rss_after_load_gb": rss,
        "new_tokens": new_tokens,
        "prefill_ms": 1000 * (stamps[0] - start),
        "decode_ms_per_token": 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the run


def step(*args: str) -> dict:
    """This script's `--step` in a fresh process; its JSON line."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: step {args[:2]} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--scratch", default="/tmp/skipvision_real_size", help="where the checkpoints are written")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's own)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each program (median)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes of the plain layout's runs")
    parser.add_argument("--no-peer", action="store_true", help="leave transformers out")
    parser.add_argument("--peer-tokens", type=int, default=NEW_TOKENS, help="tokens the peer decodes")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)  # internal: one step, in its own process
    args = parser.parse_args()
    if args.step:
        kind, *rest = args.step
        if kind == "write":
            out = write(rest[0], rest[1], args.layers or None)
        elif kind == "ours":
            batches = tuple(int(b) for b in args.batches.split(","))
            out = ours(rest[0], rest[1] if len(rest) > 1 else None, args.repeats, batches)
        else:
            out = peer(rest[0], args.peer_tokens)
        print(json.dumps(out))
        return
    results = {"layers": args.layers or "all", "repeats": args.repeats, "batches": args.batches, "models": {}}
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: unknown {name!r}, expected some of {tuple(MODELS)}")
        hf_dir, llava_dir = (os.path.join(args.scratch, name, layout) for layout in ("hf", "llava"))
        shutil.rmtree(os.path.join(args.scratch, name), ignore_errors=True)
        common = ["--layers", str(args.layers), "--repeats", str(args.repeats), "--batches", args.batches]
        row = {"written": step("--step", "write", name, hf_dir, *common)}
        row["ours_hf_layout"] = step("--step", "ours", hf_dir, llava_dir, *common)
        row["ours_llava_layout"] = step("--step", "ours", llava_dir, *common)
        if not args.no_peer:
            row["transformers"] = step("--step", "peer", hf_dir, *common, "--peer-tokens", str(args.peer_tokens))
        results["models"][name] = row
        shutil.rmtree(os.path.join(args.scratch, name), ignore_errors=True)
        print(json.dumps({name: row}), file=sys.stderr)
    sys.path.insert(0, HERE)
    from common import write_result

    # a run with fewer layers is kept apart: it never stands for the full size
    write_result(f"real_size_{args.layers}layers" if args.layers else "real_size", results)


if __name__ == "__main__":
    main()
