"""What every benchmark shares: the device's results folder, its peak FLOP/s,
its measured memory read bandwidth, interleaved timing, and the geometries."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipvision_jax.config import (
    DecoderConfig,
    LayoutConfig,
    ModelConfig,
    SkipConfig,
    VisionConfig,
)
from skipvision_jax.nn import SkipVisionVLM

# bench/gpu.sh points this at $OUT on the device machine (and at a scratch
# folder for its dry run), so that nothing but real results lands in bench/results.
RESULTS = os.environ.get("BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Dense bf16 tensor-core peaks (no sparsity), for MFU. CPUs: unknown, MFU not reported.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}

# LLaVA-1.5 geometry (336 px / 14 -> 24 x 24 = 576 visual tokens of CLIP ViT-L
# width 1024) with a decoder sized for the machine, chosen by $BENCH_GEOMETRY:
#   cpu  (default) width 512, 8 layers, 8 / 2 heads, float32: fits a 2-core CPU
#   gpu  width 2048, 16 layers, 16 / 4 heads, FFN 5632, bf16 compute (fp32 master weights)
#   toy  width 64, 2 layers: bench/gpu.sh --dry-run, the same steps in a minute on a CPU
GEOMETRIES = {
    "cpu": (
        DecoderConfig(vocab_size=32000, width=512, num_layers=8, num_heads=8, num_kv_heads=2, mlp_dim=1408),
        "float32",
    ),
    "gpu": (
        DecoderConfig(vocab_size=32000, width=2048, num_layers=16, num_heads=16, num_kv_heads=4, mlp_dim=5632),
        "bfloat16",
    ),
    "toy": (DecoderConfig(vocab_size=512, width=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128), "float32"),
}
GEOMETRY = os.environ.get("BENCH_GEOMETRY", "cpu")
if GEOMETRY not in GEOMETRIES:
    raise SystemExit(f"error: BENCH_GEOMETRY: unknown {GEOMETRY!r}, expected one of {tuple(GEOMETRIES)}")
DECODER, DTYPE = GEOMETRIES[GEOMETRY]
VISION_576 = VisionConfig(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096)
# The paper's multi-scale layout: 4 x 4 and 16 x 16 pooled grids ahead of the
# 32 x 32 patch grid: 16 + 256 + 1024 = 1296 visual tokens, the 272 coarse kept.
VISION_1296 = VisionConfig(
    image_size=448, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096, pooled_grids=(4, 16)
)


def full_config(vision: VisionConfig, dtype: str = DTYPE) -> ModelConfig:
    """Every visual token through every FFN and into the cache (plain LLaVA)."""
    return ModelConfig(vision, LayoutConfig.plain(vision.num_features), SkipConfig(enabled=False), DECODER, dtype=dtype)


def skip_config(vision: VisionConfig, num_kept: int, merge_to: int | None, dtype: str = DTYPE) -> ModelConfig:
    """Skip-Vision: kept tokens, summary tokens, the rest (merged to `merge_to`) skip every FFN."""
    return ModelConfig(
        vision,
        LayoutConfig(num_kept=num_kept, merge_to=merge_to, summary_tokens=True),
        SkipConfig(enabled=True),
        DECODER,
        dtype=dtype,
    )


def init_params(cfg: ModelConfig, inputs: dict) -> dict:
    """Random params for `cfg`, initialized from one row of `inputs` (ids, mask, vision features)."""
    model = SkipVisionVLM(cfg)
    init = jax.jit(
        lambda k: nn.unbox(
            model.init(
                k, inputs["input_ids"][:1], inputs["text_mask"][:1], vision_features=inputs["vision_features"][:1]
            )
        )["params"]
    )
    return init(jax.random.key(0))


def inference_params(params: dict) -> dict:
    """Weights stored in the geometry's compute dtype, as one serves a model:
    decoding then reads 2-byte weights under bf16, not fp32 masters."""
    return jax.tree.map(lambda x: x.astype(DTYPE) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def device_slug() -> str:
    kind = jax.devices()[0].device_kind
    return "cpu" if jax.devices()[0].platform == "cpu" else re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_BF16_FLOPS.items() if name in kind), None)


def write_result(name: str, result: dict) -> str:
    """Prints the JSON line and writes it to bench/results/<device>/<name>.json."""
    result = {
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "bench_geometry": GEOMETRY,
        **result,
    }
    folder = os.path.join(RESULTS, device_slug())
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return path


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def read_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes per second a jitted full reduction streams from device memory."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    ms = median_ms(lambda: total(x), repeats, warmup=2)
    return x.nbytes / (ms / 1000)


def copy_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes per second of a jitted device-to-device copy (read + write), the
    HBM roof as accelerator vendors quote it."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 0)  # a new buffer: every byte read once and written once
    ms = median_ms(lambda: copy(x), repeats, warmup=2)
    return 2 * x.nbytes / (ms / 1000)


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted fp32 square matmul: the compute roof as this backend reaches it."""
    a = jnp.ones((size, size), jnp.float32)
    product = jax.jit(jnp.matmul)
    ms = median_ms(lambda: product(a, a), repeats, warmup=2)
    return 2 * size**3 / (ms / 1000)


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def one_image_per(questions: list, per_image: int) -> list:
    """Every `per_image` consecutive questions (`vqa.files.Question`) on the
    first one's image: the many questions per image of GQA, POPE, MME; their
    answers are not the task's, only the load they make counts."""
    return [dataclasses.replace(q, image=questions[i - i % per_image].image) for i, q in enumerate(questions)]
