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

transformers runs its default attention (sdpa). Then the KV presses race
(`--presses`, at `--compression` 0.5): ours under each press against
transformers' `generate` inside kvpress's press context (`with press(model)`,
kvpress's way for any model; the press compresses the whole prompt at
prefill, as ours does), with the same knobs (SnapKV's window 64 and kernel 5,
4 sink tokens).

Prefill = one forward over the prompt with the image (and the press's
compression); decode per token = (time for N tokens - time for 1 token) / (N - 1).

    python bench/vs_transformers.py [--new-tokens 16] [--repeats 3] [--presses snapkv,streaming,knorm]

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
HF_RUNNERS = ("hf_eager", "hf_static", "hf_compile")
# Each press's knobs, ours and kvpress's the same (kvpress's SnapKV defaults).
PRESS_KNOBS = {"snapkv": {"obs_window": 64, "pool_kernel": 5}, "streaming": {"sink_tokens": 4}, "knorm": {}}


def kvpress_press(name: str, compression: float):
    from kvpress import KnormPress, SnapKVPress, StreamingLLMPress

    knobs = PRESS_KNOBS[name]
    return {
        "snapkv": lambda: SnapKVPress(
            compression, window_size=knobs.get("obs_window"), kernel_size=knobs.get("pool_kernel")
        ),
        "streaming": lambda: StreamingLLMPress(compression, n_sink=knobs.get("sink_tokens")),
        "knorm": lambda: KnormPress(compression),
    }[name]()


def build_checkpoint(directory: str, with_processor: bool = False) -> None:
    """A random LLaVA at the geometry above; `with_processor`: with a word-level
    tokenizer, CLIP's image processor and a chat template too (tests/hf_tiny.py's),
    a directory serve.py and eval.py take (--hf-checkpoint)."""
    import torch
    from common import DECODER
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = LlamaConfig(
        vocab_size=DECODER.vocab_size,
        hidden_size=DECODER.width,
        intermediate_size=DECODER.mlp_dim,
        num_hidden_layers=DECODER.num_layers,
        num_attention_heads=DECODER.num_heads,
        num_key_value_heads=DECODER.num_kv_heads,
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
    image_token = DECODER.vocab_size - 1
    if with_processor:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from transformers import CLIPImageProcessor, LlavaProcessor

        from tests.hf_tiny import CHAT_TEMPLATE, build_tokenizer

        tokenizer = build_tokenizer()
        image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, vision_feature_layer=-2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(directory)
    if with_processor:
        size = {"shortest_edge": vision.image_size}
        crop = {"height": vision.image_size, "width": vision.image_size}
        LlavaProcessor(
            image_processor=CLIPImageProcessor(size=size, crop_size=crop),
            tokenizer=tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        ).save_pretrained(directory)


def prompt(image_tokens: int, image_token: int) -> tuple[np.ndarray, np.ndarray]:
    """HF input ids (the image token run at IMAGE_OFFSET) and CLIP-normalized pixels [1, 3, 336, 336]."""
    rng = np.random.default_rng(0)
    text = rng.integers(3, image_token, PROMPT_TEXT)
    ids = np.concatenate([text[:IMAGE_OFFSET], np.full(image_tokens, image_token), text[IMAGE_OFFSET:]])[None]
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


def worker_ours(directory: str, new_tokens: int, repeats: int, dtype: str, press: str, compression: float) -> dict:
    import jax

    from skipvision_jax.generate import Generator
    from skipvision_jax.interop import hf_model
    from skipvision_jax.kvcache import KVPolicy

    hf = hf_model.load(directory, dtype=dtype)
    ids, pixels = prompt(hf.model_cfg.vision.num_features, hf.image_token_id)
    batch, cfg = hf_model.from_hf_inputs(hf, ids[0], pixels)
    rng = jax.random.key(0)
    policy = (
        KVPolicy.of("full") if press == "full" else KVPolicy.of(press, compression=compression, **PRESS_KNOBS[press])
    )
    one = Generator(cfg, policy, 1)
    many = Generator(cfg, policy, new_tokens)
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


def worker_hf(
    directory: str, new_tokens: int, repeats: int, kind: str, dtype_name: str, press: str, compression: float
) -> dict:
    """hf_eager: dynamic cache; hf_static: static cache; hf_compile: static
    cache with the forward under torch.compile (transformers' recipe); under a
    press (dynamic cache), inside kvpress's context."""
    import contextlib

    import torch
    from transformers import LlavaForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(device).eval()
    if kind == "hf_compile":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids, pixels = prompt(
        model.config.vision_config.image_size**2 // model.config.vision_config.patch_size**2,
        model.config.image_token_index,
    )
    inputs = {
        "input_ids": torch.from_numpy(ids).to(device),
        "attention_mask": torch.ones(ids.shape, dtype=torch.long, device=device),
        "pixel_values": torch.from_numpy(pixels).to(device, dtype),
    }
    extra = {"cache_implementation": "static"} if kind != "hf_eager" else {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    pressed = contextlib.nullcontext if press == "full" else lambda: kvpress_press(press, compression)(model)

    def generate(n):
        with torch.inference_mode(), pressed():
            return model.generate(
                **inputs,
                max_new_tokens=n,
                min_new_tokens=0,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                **extra,
            )

    def prefill():
        from transformers import DynamicCache

        with torch.inference_mode(), pressed():
            # logits of the last position only, as generate's own prefill computes
            model(**inputs, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        sync()

    prefill_ms = timed(prefill, repeats)
    t1 = timed(lambda: (generate(1), sync()), repeats)
    tn = timed(lambda: (generate(new_tokens), sync()), repeats)
    tokens = generate(new_tokens)[0, ids.shape[1] :].tolist()
    return {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": (tn - t1) / (new_tokens - 1),
        "answer_ms": tn,
        "tokens": tokens,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
    }


def run_worker(kind: str, directory: str, args, dtype: str, press: str = "full") -> dict:
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
        "--dtype",
        dtype,
        "--press",
        press,
        "--compression",
        str(args.compression),
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=("ours", *HF_RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--runners", default="ours,hf_eager,hf_static", help=f"ours and some of {HF_RUNNERS}")
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument(
        "--presses", default="snapkv,streaming,knorm", help=f"KV presses raced, of {tuple(PRESS_KNOBS)}"
    )
    parser.add_argument("--compression", type=float, default=0.5)
    parser.add_argument("--press", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        print(
            json.dumps(worker_ours(args.dir, args.new_tokens, args.repeats, args.dtype, args.press, args.compression))
        )
        return
    if args.worker:
        row = worker_hf(args.dir, args.new_tokens, args.repeats, args.worker, args.dtype, args.press, args.compression)
        print(json.dumps(row))
        return

    from common import DECODER, DTYPE, write_result

    runners = args.runners.split(",")
    presses = [p for p in args.presses.split(",") if p]
    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(directory)
        rows = {kind: run_worker(kind, directory, args, DTYPE) for kind in runners}
        raced = {
            press: {kind: run_worker(kind, directory, args, DTYPE, press) for kind in ("ours", "hf_eager")}
            for press in presses
        }
    ours = rows["ours"]
    d = DECODER
    result = {
        "geometry": {
            "image_tokens": 576,
            "text_tokens": PROMPT_TEXT,
            "new_tokens": args.new_tokens,
            "batch": 1,
            "dtype": DTYPE,
            "decoder": f"width {d.width}, {d.num_layers} layers, {d.num_heads}/{d.num_kv_heads} heads, mlp {d.mlp_dim}, vocab {d.vocab_size}",
            "tower": "CLIP 336/14, 2 layers, width 256",
        },
        **rows,
    }
    for kind in runners[1:]:
        row = rows[kind]
        if "error" in row:
            continue
        row["same_tokens_as_ours"] = row["tokens"] == ours["tokens"]
        result[f"prefill_speedup_vs_{kind}"] = row["prefill_ms"] / ours["prefill_ms"]
        result[f"decode_tokens_per_s_ratio_vs_{kind}"] = row["decode_ms_per_token"] / ours["decode_ms_per_token"]
    result["presses"] = {"compression": args.compression, "knobs": {p: PRESS_KNOBS[p] for p in presses}, "rows": []}
    for press, pair in raced.items():
        row = {"press": press, **{f"{kind}_{k}": v for kind, r in pair.items() for k, v in r.items()}}
        if not any("error" in r for r in pair.values()):
            ours_p, theirs = pair["ours"], pair["hf_eager"]
            row["same_tokens"] = ours_p["tokens"] == theirs["tokens"]
            row["prefill_speedup"] = theirs["prefill_ms"] / ours_p["prefill_ms"]
            row["decode_tokens_per_s_ratio"] = theirs["decode_ms_per_token"] / ours_p["decode_ms_per_token"]
        result["presses"]["rows"].append(row)
    write_result("vs_transformers", result)


if __name__ == "__main__":
    main()
