"""An experiment's model: the model config of a run (from `cfg.model`, a
Hugging Face LLaVA directory, the parts it starts from or an earlier run's
config), and the config an earlier run was trained with."""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from skipvision_jax.config import ModelConfig, model_config_from_dict
from skipvision_jax.data.pipeline import DataSpec
from skipvision_jax.errors import CheckpointError
from skipvision_jax.interop import hf_llava, llava_layout
from skipvision_jax.interop.parts import given_parts, model_config_from_parts


def base_model_config(cfg) -> ModelConfig:
    """`cfg.model`, with the tower and decoder sizes of where the run starts:
    a Hugging Face LLaVA directory (`cfg.init_from_hf`), the parts
    (`cfg.init.language_model` / `vision_tower`, interop/parts.py) or an
    earlier run (`cfg.init.checkpoint`), under `cfg.model`'s layout, skip and dtype."""
    ours = model_config_from_dict(cfg.model.to_dict())
    init = cfg.get("init") or {}
    parts = given_parts(init)
    starts = {
        "init_from_hf": cfg.get("init_from_hf"),
        "init.checkpoint": init.get("checkpoint"),
        "the parts (init.language_model, init.vision_tower, init.projector)": parts,
    }
    given = [name for name, value in starts.items() if value]
    if len(given) > 1:
        raise ValueError(f"{given[0]}: a run starts from one of {', '.join(starts)}; got {' and '.join(given)}")
    if init.get("checkpoint"):  # LLaVA's stage 2: the sizes stage 1 trained
        trained = base_model_config(run_config(init["checkpoint"]))
        return dataclasses.replace(ours, vision=trained.vision, decoder=trained.decoder)
    if parts:
        return model_config_from_parts(ours, parts)
    if not cfg.get("init_from_hf"):
        return ours
    if ours.scan_layers:
        raise ValueError("model.scan_layers: init_from_hf loads unrolled layers; set it to False")
    hf_config = hf_llava.read_config(cfg.init_from_hf)
    if llava_layout.is_llava_layout(hf_config):  # LLaVA's own layout: its tower and decoder, our layout and skip
        imported = llava_layout.model_config_from_llava(hf_config, cfg.init_from_hf, False, ours.dtype)
    else:
        imported = hf_llava.model_config_from_hf(hf_config, dtype=ours.dtype)
    vision = dataclasses.replace(imported.vision, pooled_grids=ours.vision.pooled_grids)
    return dataclasses.replace(
        imported, layout=ours.layout, skip=ours.skip, vision=vision, remat=ours.remat, remat_policy=ours.remat_policy
    )


def model_image_size(cfg) -> int:
    """The image side the data pipeline must produce."""
    return base_model_config(cfg).vision.image_size


def build_model_config(cfg, data: DataSpec) -> ModelConfig:
    model_cfg = base_model_config(cfg)
    if model_cfg.layout.image_offset != data.image_offset:
        raise ValueError(
            f"model.layout.image_offset: {model_cfg.layout.image_offset}, but the data puts the image after {data.image_offset} text tokens"
        )
    if model_cfg.decoder.vocab_size < data.vocab_size:
        raise ValueError(
            f"model.decoder.vocab_size: {model_cfg.decoder.vocab_size} is smaller than the tokenizer's {data.vocab_size}"
        )
    return model_cfg


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a train.py workdir was trained with."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"no checkpoint at {workdir} (missing config.json)")
    with open(config_path) as f:
        return ml_collections.ConfigDict(json.load(f))
