"""A bf16 model's prefill and decode programs need temporaries that do not
grow with its depth.

XLA:CPU computes a bf16 matrix product in f32 over an f32 copy of the
weight. Left to itself, its concurrency-optimized scheduler started every
layer's copy at once (a full-size LLaVA-1.5-7B prefill asked for 27 GB of
temporaries on top of its 14 GB of weights), and loop-invariant code motion
hoisted every copy out of the decode loop (26 GB). `skipvision_jax`
turns that scheduler off on import (`compilation.bound_cpu_memory`) and
`Generator.step` ties the weights to the loop's state. Measured here from the
compiled programs' `memory_analysis()` at 2 and 6 decoder layers: four more
layers may add at most a quarter of their f32 copies' bytes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from skipvision_jax.config import DecoderConfig, LayoutConfig, ModelConfig, SkipConfig, VisionConfig
from skipvision_jax.generate import Generator
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn.shapes import abstract_params

# Wide enough that the per-layer weight copies dwarf activations (16 MB each in f32).
VISION = VisionConfig(image_size=32, patch_size=8, width=64, depth=1, num_heads=2, mlp_dim=128)
DECODER = DecoderConfig(vocab_size=1000, width=512, num_layers=2, num_heads=8, num_kv_heads=8, mlp_dim=2048)
NUM_TEXT, NEW_TOKENS = 16, 8


def config(num_layers: int, skip: bool) -> ModelConfig:
    return ModelConfig(
        vision=VISION,
        layout=LayoutConfig(image_offset=4, num_kept=4, merge_to=4, summary_tokens=skip),
        skip=SkipConfig(enabled=skip),
        decoder=dataclasses.replace(DECODER, num_layers=num_layers),
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


def temporaries(cfg: ModelConfig) -> tuple[int, int]:
    """Temporary bytes of the compiled prefill and decode programs."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params(cfg, None))
    size = cfg.vision.image_size
    batch = {
        "input_ids": jax.ShapeDtypeStruct((1, NUM_TEXT), np.int32),
        "text_mask": jax.ShapeDtypeStruct((1, NUM_TEXT), bool),
        "pixels": jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
    }
    generator = Generator(cfg, KVPolicy.of("full"), NEW_TOKENS)
    rng = jax.random.key(0)
    prefill = jax.jit(generator.prefill).lower(params, batch, rng).compile()
    state = jax.eval_shape(generator.prefill, params, batch, rng)
    decode = jax.jit(generator.decode).lower(params, state).compile()
    return prefill.memory_analysis().temp_size_in_bytes, decode.memory_analysis().temp_size_in_bytes


def layer_f32_bytes(d: DecoderConfig) -> int:
    return 4 * (4 * d.width * d.width + 3 * d.width * d.mlp_dim)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip_ffn"])
def test_temporaries_do_not_grow_with_depth(skip):
    (prefill_2, decode_2), (prefill_6, decode_6) = (temporaries(config(n, skip)) for n in (2, 6))
    allowed = 0.25 * 4 * layer_f32_bytes(DECODER)
    assert prefill_6 - prefill_2 <= allowed, (prefill_2, prefill_6)
    assert decode_6 - decode_2 <= allowed, (decode_2, decode_6)
