"""Our jitted prefill + decode loop against Hugging Face transformers on
PyTorch: same imported weights, same prompt, same greedy tokens (checked).

A random LlavaForConditionalGeneration is built by transformers at the
LLaVA-1.5 geometry (336 px / 14 = 576 image tokens) with a scaled-down tower
(2 layers, width 256) and the benchmark decoder (width 512, 8 layers,
8 heads / 2 KV heads, vocab 32000), saved, and imported by us. Each side
runs in its own process (peak resident memory is per process), batch 1,
fp32, `--new-tokens` greedy tokens with no stop token:

    ours          Generator, `full` policy (plain LLaVA: Skip-FFN off)
    hf_eager      model.generate(do_sample=False), dynamic cache
    hf_static     the same with cache_implementation="static"

Prefill = one forward over the prompt with the image; decode per token =
(time for N tokens - time for 1 token) / (N - 1).

    python bench/vs_transformers.py [--new-tokens 16] [--repeats 3]

Prints one JSON line; writes bench/results/<device>/vs_transformers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

PROMPT_TEXT = 32  # text tokens around the image
IMAGE_OFFSET = 5


def build_checkpoint(directory: str) -> None:
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, vision_feature_layer=-2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(directory)


def prompt(image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """HF input ids (the image token run at IMAGE_OFFSET) and CLIP-normalized pixels [1, 3, 336, 336]."""
    rng = np.random.default_rng(0)
    text = rng.integers(3, 31000, PROMPT_TEXT)
    ids = np.concatenate([text[:IMAGE_OFFSET], np.full(image_tokens, 31999), text[IMAGE_OFFSET:]])[None]
    return ids.astype(np.int64), rng.standard_normal((1, 3, 336, 336)).astype(np.float32)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and, for us, compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def worker_ours(directory: str, new_tokens: int, repeats: int) -> dict:
    import jax

    from skipvision_jax.generate import Generator
    from skipvision_jax.interop import hf_model
    from skipvision_jax.kvcache import KVPolicy

    hf = hf_model.load(directory)
    ids, pixels = prompt(hf.model_cfg.vision.num_features)
    batch, cfg = hf_model.from_hf_inputs(hf, ids[0], pixels)
    rng = jax.random.key(0)
    one = Generator(cfg, KVPolicy("full"), 1)
    many = Generator(cfg, KVPolicy("full"), new_tokens)
    prefill_ms = timed(lambda: jax.block_until_ready(one.prefill(hf.params, batch, rng).tokens), repeats)
    t1 = timed(lambda: jax.block_until_ready(one(hf.params, batch, rng).tokens), repeats)
    tn = timed(lambda: jax.block_until_ready(many(hf.params, batch, rng).tokens), repeats)
    tokens = np.asarray(many(hf.params, batch, rng).tokens[0]).tolist()
    memory = jax.devices()[0].memory_stats() or {}
    return {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": (tn - t1) / (new_tokens - 1),
        "answer_ms": tn,
        "tokens": tokens,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_device_bytes": memory.get("peak_bytes_in_use"),
    }


def worker_hf(directory: str, new_tokens: int, repeats: int, cache: str | None) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    ids, pixels = prompt(model.config.vision_config.image_size**2 // model.config.vision_config.patch_size**2)
    inputs = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.ones(ids.shape, dtype=torch.long),
        "pixel_values": torch.from_numpy(pixels),
    }
    extra = {"cache_implementation": cache} if cache else {}

    def generate(n):
        with torch.inference_mode():
            return model.generate(
                **inputs,
                max_new_tokens=n,
                min_new_tokens=0,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                **extra,
            )

    with torch.inference_mode():
        # logits of the last position only, as generate's own prefill computes
        prefill_ms = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), repeats)
    t1 = timed(lambda: generate(1), repeats)
    tn = timed(lambda: generate(new_tokens), repeats)
    tokens = generate(new_tokens)[0, ids.shape[1] :].tolist()
    return {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": (tn - t1) / (new_tokens - 1),
        "answer_ms": tn,
        "tokens": tokens,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }


def run_worker(kind: str, directory: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--dir",
        directory,
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=("ours", "hf_eager", "hf_static"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        print(json.dumps(worker_ours(args.dir, args.new_tokens, args.repeats)))
        return
    if args.worker:
        print(
            json.dumps(
                worker_hf(args.dir, args.new_tokens, args.repeats, "static" if args.worker == "hf_static" else None)
            )
        )
        return

    from common import write_result

    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(directory)
        rows = {kind: run_worker(kind, directory, args) for kind in ("ours", "hf_eager", "hf_static")}
    ours = rows["ours"]
    result = {
        "geometry": {
            "image_tokens": 576,
            "text_tokens": PROMPT_TEXT,
            "new_tokens": args.new_tokens,
            "batch": 1,
            "dtype": "float32",
            "decoder": "width 512, 8 layers, 8/2 heads, mlp 1408, vocab 32000",
            "tower": "CLIP 336/14, 2 layers, width 256",
        },
        **rows,
    }
    for kind in ("hf_eager", "hf_static"):
        row = rows[kind]
        if "error" in row:
            continue
        row["same_tokens_as_ours"] = row["tokens"] == ours["tokens"]
        result[f"prefill_speedup_vs_{kind}"] = row["prefill_ms"] / ours["prefill_ms"]
        result[f"decode_tokens_per_s_ratio_vs_{kind}"] = row["decode_ms_per_token"] / ours["decode_ms_per_token"]
    write_result("vs_transformers", result)


if __name__ == "__main__":
    main()
