"""The original LLaVA checkpoint layout in and out: `LlavaLlamaForCausalLM`
of haotian-liu/LLaVA (`llava/model/language_model/llava_llama.py`,
`llava/model/llava_arch.py`), which the official Skip-Vision code saves too
and most LLaVA-family research checkpoints use.

One directory: config.json, a Llama config at the top level plus the `mm_*`
fields (`mm_vision_select_layer`, `mm_vision_select_feature`,
`mm_projector_type`, `mm_hidden_size`, `mm_vision_tower`; the official
`use_zip` for its 100 CLS-attention-selected tokens), and the tensors

    model.embed_tokens.* model.layers.* model.norm.* lm_head.*      the language model
    model.vision_tower.vision_tower.vision_model.*                   the CLIP tower
    model.mm_projector.{0,2}.*                                       the MLP projector
    model.ada.{0,1}.*                                                the official summary pool

(`model.ada = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))`, one pool for
q1 and q2: `llama_squeeze_expand576_100pass_tome156_add_q_q_adainit_casual_pass_o.py`
about lines 1034 and 1122-1128 of zwl666666/Skip-Vision).

LLaVA keeps the tower's architecture in the tower's own directory
(`mm_vision_tower`); an export also writes it under `vision_config`, and our
layout and Skip-FFN settings under `skipvision_jax`, which LLaVA's code
ignores. Reading, the layout comes from that block; without it, a checkpoint
with `model.ada` and `use_zip` reads as the official LLaVA setting
(config.py's `OFFICIAL_LLAVA_LAYOUT`: 100 kept by CLS attention, 476 merged to 156, one pool)
and one without `model.ada` as plain LLaVA.
"""

from __future__ import annotations

import dataclasses
import json
import os

from skipvision_jax.config import OFFICIAL_LLAVA_LAYOUT, LayoutConfig, ModelConfig, SkipConfig
from skipvision_jax.interop import hf_llava
from skipvision_jax.interop.hf_llava import HFCheckpointError
from skipvision_jax.interop.parts import tower_config

# LLaVA's tensor names -> our groups (hf_llava's rules map the groups; longest prefix first).
LLAVA_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "vision."),
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
    ("model.ada.0.", "summary.norm."),
    ("model.ada.1.", "summary.score."),
    ("model.", "text."),
    ("lm_head.", "lm_head."),
)
LLAVA_NAMES = {group: prefix for prefix, group in LLAVA_PREFIXES}
LLAVA_GROUPS = (*hf_llava.HF_GROUPS, "summary.")

_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}  # LLaVA's -> transformers' names


def is_llava_layout(config: dict) -> bool:
    """Whether a config.json is LLaVA's own (`llava_llama`), not transformers' `llava`."""
    return config.get("model_type") != "llava" and "mm_projector_type" in config


def llava_config_from_model(cfg: ModelConfig, vision_tower: str = "") -> dict:
    """LLaVA's config.json for our model (`vision_tower`: the CLIP directory
    or hub name LLaVA's code rebuilds the tower from)."""
    layout = cfg.layout
    if cfg.vision.pooled_grids:
        raise HFCheckpointError("vision.pooled_grids: the LLaVA layout has one CLIP feature map, no pooled grids")
    if layout.summary_tokens and layout.summary_pool != "shared":
        raise HFCheckpointError(
            "layout.summary_pool: 'separate' has two summary pools; the LLaVA layout holds one (model.ada), so only 'shared' exports"
        )
    if cfg.skip.enabled and cfg.skip.partition == "topk":
        raise HFCheckpointError("skip.partition: the topk router has no place in the LLaVA layout")
    v = cfg.vision
    config = hf_llava.decoder_config_to_hf(cfg.decoder)
    config.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=vision_tower,
        mm_hidden_size=v.width,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=v.select_layer,
        mm_vision_select_feature="patch" if v.select_strategy == "patch" else "cls_patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        use_mm_proj=True,
        use_zip=layout.select == "cls_attention",
        vision_config=hf_llava.vision_config_to_hf(v),
        skipvision_jax={"layout": dataclasses.asdict(layout), "skip": dataclasses.asdict(cfg.skip)},
    )
    return config


def save(directory: str, params: dict, cfg: ModelConfig, vision_tower: str = "") -> None:
    """Writes config.json + model.safetensors (sharded past `hf_llava.SHARD_BYTES`) in LLaVA's layout. The tower
    holds the layers up to the selected one (what LLaVA's features read)."""
    config = llava_config_from_model(cfg, vision_tower)
    os.makedirs(directory, exist_ok=True)
    hf_llava.write_safetensors(directory, hf_llava.export_tensors(params, names=LLAVA_NAMES))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _vision_config(config: dict, directory: str) -> dict:
    if config.get("vision_config"):
        return config["vision_config"]
    tower = config.get("mm_vision_tower") or ""
    if os.path.isdir(tower):
        return tower_config(tower)
    raise HFCheckpointError(
        f"{directory}/config.json: no vision_config, and mm_vision_tower {tower!r} is not a local CLIP directory to read the tower's architecture from"
    )


def model_config_from_llava(
    config: dict, directory: str, has_summary_pool: bool, dtype: str = "float32"
) -> ModelConfig:
    """Our ModelConfig for LLaVA's config.json (the module docstring says
    where the layout comes from; `has_summary_pool`: the tensors hold `model.ada`)."""
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise HFCheckpointError(f"mm_vision_select_feature: {feature!r} is not supported (patch or cls_patch)")
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise HFCheckpointError(
            f"mm_projector_type: {config['mm_projector_type']!r} is not supported (LLaVA-1.5's mlp2x_gelu)"
        )
    vision = hf_llava.vision_config_from_hf(
        _vision_config(config, directory), config.get("mm_vision_select_layer", -2), _SELECT_FEATURE[feature]
    )
    decoder = hf_llava.decoder_config_from_hf({**config, "model_type": "llama"})
    ours = config.get("skipvision_jax")
    if ours:
        layout, skip = LayoutConfig(**ours["layout"]), SkipConfig(**ours["skip"])
    elif has_summary_pool:
        if not config.get("use_zip"):
            raise HFCheckpointError(
                f"{directory}/config.json: model.ada without use_zip is not the official LLaVA setting; its layout is unknown"
            )
        layout, skip = LayoutConfig(**OFFICIAL_LLAVA_LAYOUT), SkipConfig()
    else:
        layout, skip = LayoutConfig.plain(vision.num_features), SkipConfig(enabled=False)
    return ModelConfig(vision=vision, layout=layout, skip=skip, decoder=decoder, dtype=dtype)
