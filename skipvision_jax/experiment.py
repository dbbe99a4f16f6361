"""An experiment's model: the model config of a run (from `cfg.model`, a
Hugging Face LLaVA directory, the parts it starts from or an earlier run's
config), and the config an earlier run was trained with."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import ml_collections

from skipvision_jax.config import ModelConfig, model_config_from_dict
from skipvision_jax.data.pipeline import text_format
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
        imported,
        layout=ours.layout,
        skip=ours.skip,
        vision=vision,
        param_dtype=ours.param_dtype,  # a run trains in its own (float32 master weights by default)
        remat=ours.remat,
        remat_policy=ours.remat_policy,
    )


def model_image_size(cfg) -> int:
    """The image side the data pipeline must produce."""
    return base_model_config(cfg).vision.image_size


def with_data_settings(cfg, text) -> ml_collections.ConfigDict:
    """A copy of `cfg` with what follows from its text format (`data.text_format`)
    filled in where the config leaves it None: `model.layout.image_offset` (the
    template's tokens before the image) and `model.decoder.vocab_size` (the
    tokenizer's). An explicit value that cannot be right is a one-line error."""
    cfg = copy.deepcopy(cfg)
    layout, decoder = cfg.model.layout, cfg.model.decoder
    if layout.image_offset is None:
        layout.image_offset = text.image_offset
    elif layout.image_offset != text.image_offset:
        raise ValueError(
            f"model.layout.image_offset: {layout.image_offset}, but the data puts the image after {text.image_offset} text tokens"
            " (leave it unset to take it from the data)"
        )
    if decoder.vocab_size is None:
        decoder.vocab_size = text.vocab_size
    elif decoder.vocab_size < text.vocab_size:
        raise ValueError(
            f"model.decoder.vocab_size: {decoder.vocab_size} is smaller than the tokenizer's {text.vocab_size}"
            " (leave it unset to take it from the tokenizer)"
        )
    return cfg


def build_model_config(cfg, text) -> ModelConfig:
    """The model config of `cfg` (its data settings filled in, `with_data_settings`)
    for a text format: the image sits where that format puts it (a run's own,
    or another template's at evaluation), and a model that starts from other
    weights must still hold the tokenizer's vocabulary."""
    model_cfg = base_model_config(cfg)
    if model_cfg.decoder.vocab_size < text.vocab_size:
        raise ValueError(
            f"model.decoder.vocab_size: {model_cfg.decoder.vocab_size} is smaller than the tokenizer's {text.vocab_size}"
        )
    return dataclasses.replace(model_cfg, layout=dataclasses.replace(model_cfg.layout, image_offset=text.image_offset))


# Where a LLaVA-format config leaves them to a tokenizer it does not have at
# hand, sizing without data (bench/scale.py) takes LLaVA-1.5's: 35 tokens of
# vicuna_v1 prompt before the image in LLaMA's tokenizer, and its 32,000 tokens.
STAND_IN_TEXT = {"image_offset": 35, "vocab_size": 32000}


def sizing_model_config(cfg) -> ModelConfig:
    """The model config of `cfg` without training it: what follows from the
    data comes from the generated task, or from `data.tokenizer` where that
    file exists, else from `STAND_IN_TEXT`. For sizing programs and counting
    FLOPs; a run derives its own (`with_data_settings`)."""
    data = cfg.data
    if data.kind != "llava" or (data.get("tokenizer") and os.path.exists(data.tokenizer)):
        return base_model_config(with_data_settings(cfg, text_format(data)))
    cfg = copy.deepcopy(cfg)
    layout, decoder = cfg.model.layout, cfg.model.decoder
    layout.image_offset = STAND_IN_TEXT["image_offset"] if layout.image_offset is None else layout.image_offset
    decoder.vocab_size = STAND_IN_TEXT["vocab_size"] if decoder.vocab_size is None else decoder.vocab_size
    return base_model_config(cfg)


RUN_TOKENIZER = "tokenizer.json"  # a run's own copy, beside its config.json


def run_text_format(workdir: str, cfg, template: str | None = None):
    """The text format a run trained with, from its workdir alone (its
    config.json and its copy of the tokenizer); `template` overrides the
    run's (eval's --conv-mode)."""
    data_cfg = copy.deepcopy(cfg.data)
    if template is not None:
        if data_cfg.kind != "llava":
            raise ValueError(
                f"--conv-mode: the {data_cfg.kind} task has one prompt format; it applies to LLaVA-format runs"
            )
        data_cfg.template = template
    if data_cfg.kind != "llava":
        return text_format(data_cfg)
    tokenizer = os.path.join(workdir, RUN_TOKENIZER)
    if not os.path.exists(tokenizer):
        raise CheckpointError(f"{workdir}: no {RUN_TOKENIZER} (train.py keeps the run's tokenizer there)")
    return text_format(data_cfg, tokenizer)


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a train.py workdir was trained with."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"no checkpoint at {workdir} (missing config.json)")
    with open(config_path) as f:
        return ml_collections.ConfigDict(json.load(f))
