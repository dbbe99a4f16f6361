"""Parity with transformers at the widths users run (float32, CPU): the full
CLIP ViT-L/14-336 tower; decoders at Vicuna-7B's width (4096, 32 heads,
11,008, the full 32,000 vocabulary) and at LLaMA-3-8B's (32 query / 8 KV
heads, 14,336, 128,256 tokens, RoPE theta 500,000 with Llama 3.1's llama3
scaling), two layers each. Each is a random LlavaForConditionalGeneration
written by transformers and read by `hf_model.load`, as a user's checkpoint is.

Logits agree within 2e-4 of their spread (the largest absolute logit); greedy
decoding gives the same tokens as transformers' `generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from skipvision_jax.generate import Generator
from skipvision_jax.interop import hf_model
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn import SkipVisionVLM
from tests.hf_tiny import VARIANTS, make_hf_llava, write_image

QUESTION = "what is in the picture ?"
LOGIT_TOLERANCE = 2e-4  # of the largest absolute logit

CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
)
VICUNA_7B_2 = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=32,
    rope_theta=10000.0,
    vocab_size=32000,
)
LLAMA3_8B_2 = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
LLAVA = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
VARIANTS.update(
    {
        "clip_l336": dict(
            vision=CLIP_L_336, text={**VARIANTS["gqa"]["text"], "max_position_embeddings": 1024}, llava=LLAVA
        ),
        "vicuna7b_2": dict(vision=VARIANTS["gqa"]["vision"], text=VICUNA_7B_2, llava=LLAVA),
        "llama3_8b_2": dict(vision=VARIANTS["gqa"]["vision"], text=LLAMA3_8B_2, llava=LLAVA),
    }
)


def run_both(directory: str, torch_model, image_path: str, steps: int = 6):
    """(our logits, transformers' logits) at the prompt's text positions, and
    (our greedy tokens, transformers' `generate` tokens)."""
    hf = hf_model.load(directory)
    assert hf.model_cfg.param_dtype == "float32"  # the checkpoint's own dtype
    batch, cfg = hf_model.encode(hf, Image.open(image_path), QUESTION)
    ours = np.asarray(
        SkipVisionVLM(cfg).apply({"params": hf.params}, batch["input_ids"], batch["text_mask"], batch["pixels"])[0]
    )
    inputs = hf.processor(
        images=Image.open(image_path), text=hf_model.chat_prompt(hf.processor, QUESTION), return_tensors="pt"
    )
    with torch.no_grad():
        theirs = torch_model(**inputs).logits[0].numpy()[inputs["input_ids"][0].numpy() != hf.image_token_id]
        generated = torch_model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    expected_tokens = generated[0, inputs["input_ids"].shape[1] :].numpy()
    state = Generator(cfg, KVPolicy.of("full"), steps, stop_ids=(), pad_id=3)(hf.params, batch)
    return ours, theirs, np.asarray(state.tokens[0])[:steps], expected_tokens


@pytest.mark.parametrize(
    "variant",
    [
        "clip_l336",
        "vicuna7b_2",
        pytest.param("llama3_8b_2", marks=pytest.mark.slow),  # 1.5 billion parameters: about 18 GB at its peak
    ],
)
def test_real_width_matches_transformers(variant, tmp_path):
    directory = str(tmp_path / variant)
    torch_model = make_hf_llava(directory, variant)
    image = write_image(str(tmp_path / "image.png"), size=400)
    ours, theirs, tokens, expected = run_both(directory, torch_model, image)
    assert np.abs(ours - theirs).max() <= LOGIT_TOLERANCE * np.abs(theirs).max()
    np.testing.assert_array_equal(tokens, expected)
