"""Training from the parts as they ship, the paper's recipe: a transformers
`LlamaForCausalLM` directory (Vicuna, LLaMA-3; llama3 RoPE scaling; tied or
untied head), a `CLIPVisionModel` or `CLIPModel` directory, and LLaVA's
pretrain-stage projector (`mm_projector.bin` or a safetensors file, keys
`model.mm_projector.{0,2}.*`). Config section `init`:

    --config.init.language_model=DIR --config.init.vision_tower=DIR [--config.init.projector=FILE]

The decoder and tower sizes come from the directories' config.json; the
layout, Skip-FFN, the feature layer (`model.vision.select_layer`) and the
pooled grids come from our config. Every tensor a part is asked for must be
there and fit, or the error names the tensor and the file: nothing a part
names starts silently from random. What no part covers (the summary pool,
the projector when `init.projector` is empty) keeps its fresh initialization.
"""

from __future__ import annotations

import dataclasses

from skipvision_jax.config import ModelConfig
from skipvision_jax.interop import hf_llava

# config section `init` -> (the groups of our tensors it supplies, how its tensor names read)
PARTS = {
    "language_model": (("text.", "lm_head."), hf_llava.LANGUAGE_MODEL_PREFIXES),
    "vision_tower": (("vision.",), hf_llava.VISION_TOWER_PREFIXES),
    "projector": (("projector.",), hf_llava.PROJECTOR_PREFIXES),
}


def given_parts(init_cfg) -> dict[str, str]:
    """The parts an `init` config section names (empty strings left out)."""
    init_cfg = init_cfg or {}
    return {name: init_cfg[name] for name in PARTS if init_cfg.get(name, "")}


def tower_config(directory: str) -> dict:
    """The CLIP vision config of a CLIPVisionModel or CLIPModel directory."""
    config = hf_llava.read_config(directory)
    if config.get("model_type") == "clip":
        config = config.get("vision_config") or {}
    return config


def model_config_from_parts(ours: ModelConfig, parts: dict[str, str]) -> ModelConfig:
    """`ours` with the decoder of `parts["language_model"]` and the tower of
    `parts["vision_tower"]` (each where given), read from their config.json."""
    if ours.scan_layers:
        raise ValueError("model.scan_layers: the parts load into unrolled layers; set it to False")
    vision, decoder = ours.vision, ours.decoder
    if parts.get("vision_tower"):
        strategy = hf_llava.select_strategy(ours.vision)
        imported = hf_llava.vision_config_from_hf(tower_config(parts["vision_tower"]), vision.select_layer, strategy)
        vision = dataclasses.replace(imported, pooled_grids=vision.pooled_grids)
    if parts.get("language_model"):
        decoder = hf_llava.decoder_config_from_hf(hf_llava.read_config(parts["language_model"]))
    return dataclasses.replace(ours, vision=vision, decoder=decoder)


def load_parts(parts: dict[str, str], params: dict, abstract_params: dict) -> dict:
    """`params` with every tensor of the given parts in place (in its sharding)."""
    for name, path in parts.items():
        groups, prefixes = PARTS[name]
        imported, _ = hf_llava.load_params(path, abstract_params, strict=False, groups=groups, prefixes=prefixes)
        params = hf_llava.merge_into(params, imported)
    return params
