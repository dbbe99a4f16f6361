"""Tiny random LLaVA checkpoints written by transformers (PyTorch, CPU), with
a word-level tokenizer, a chat template and a CLIP image processor: a complete
Hugging Face directory, built offline."""

from __future__ import annotations

import numpy as np
from PIL import Image

WORDS = "what is in the picture ? a red blue green square ring dot cross one two three left right".split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)

# Two shapes: GQA with the usual choices; MHA with odd sizes, tied embeddings,
# the class token kept and the last vision layer selected.
VARIANTS = {
    "gqa": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            hidden_act="quick_gelu",
        ),
        text=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
        ),
        llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False),
    ),
    # Llama 3.1's RoPE: with a 64-token original context the 12-dim heads have
    # wavelengths in all three bands (kept, interpolated, stretched).
    "gqa_llama3": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            hidden_act="quick_gelu",
        ),
        text=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False),
    ),
    "mha_odd": dict(
        vision=dict(
            hidden_size=36,
            intermediate_size=52,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=21,
            patch_size=7,
            hidden_act="gelu",
        ),
        text=dict(
            hidden_size=42,
            intermediate_size=70,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            rope_theta=500.0,
            tie_word_embeddings=True,
        ),
        llava=dict(vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True),
    ),
}


# mha_odd with its own LM head: a tied head makes a random model repeat its
# last token whatever it attends to, so answers could not show which keys a
# KV policy kept (tests/test_kvpress.py).
VARIANTS["mha_untied"] = {
    **VARIANTS["mha_odd"],
    "text": {**VARIANTS["mha_odd"]["text"], "tie_word_embeddings": False},
    "llava": {**VARIANTS["mha_odd"]["llava"], "tie_word_embeddings": False},
}


def build_tokenizer(words: list[str] = WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(set(words), key=words.index))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_tokens(["USER:", "ASSISTANT:"])
    return tokenizer


def make_hf_llava(directory: str, variant: str = "gqa", seed: int = 0):
    """Writes a random LlavaForConditionalGeneration (and its processor) to
    `directory`; returns the torch model (eval mode, float32)."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = VARIANTS[variant]
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        # a variant may give the full vocabulary, or room for a bigger image
        **{"vocab_size": len(tokenizer), "max_position_embeddings": 512, **spec["text"]},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    vision = CLIPVisionConfig(projection_dim=16, **spec["vision"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id, **spec["llava"])
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 / 0: perturb them so the mapping of each is tested
        for name, param in model.named_parameters():
            if "norm" in name or "class_embedding" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    size = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=spec["llava"]["vision_feature_select_strategy"],
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)
    return model


def write_image(path: str, size: int = 24, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_parts(directory: str, words: list[str], seed: int = 0, clip_model: bool = False) -> dict[str, str]:
    """The parts LLaVA trains from, random and tiny, as they ship: a
    LlamaForCausalLM directory with its tokenizer (`words` plus the
    specials), a CLIPVisionModel directory (a CLIPModel one with
    `clip_model`) and a pretrain-stage `mm_projector.bin`. Returns their paths."""
    import os

    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    spec = VARIANTS["gqa"]
    tokenizer = build_tokenizer(words)
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **spec["text"]
    )
    language_model = LlamaForCausalLM(text).eval()
    vision = CLIPVisionConfig(projection_dim=16, **spec["vision"])
    if clip_model:
        text_half = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        tower = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text_half, projection_dim=16))
    else:
        tower = CLIPVisionModel(vision)
    with torch.no_grad():  # norms start at 1 / 0: perturb them so that their mapping is tested
        for model in (language_model, tower):
            for name, param in model.named_parameters():
                if "norm" in name or "class_embedding" in name:
                    param.add_(0.1 * torch.randn_like(param))
    paths = {
        "language_model": os.path.join(directory, "language_model"),
        "vision_tower": os.path.join(directory, "vision_tower"),
        "projector": os.path.join(directory, "mm_projector.bin"),
    }
    language_model.save_pretrained(paths["language_model"])
    tokenizer.save_pretrained(paths["language_model"])
    tower.save_pretrained(paths["vision_tower"])
    width, vision_width = text.hidden_size, vision.hidden_size
    torch.save(
        {
            "model.mm_projector.0.weight": torch.randn(width, vision_width),
            "model.mm_projector.0.bias": torch.randn(width),
            "model.mm_projector.2.weight": torch.randn(width, width),
            "model.mm_projector.2.bias": torch.randn(width),
        },
        paths["projector"],
    )
    return paths
