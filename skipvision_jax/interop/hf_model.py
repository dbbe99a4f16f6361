"""A Hugging Face LLaVA directory as a ready model: config, params (on a mesh),
and the directory's own processor (tokenizer, chat template, image preprocessing).

    hf = load("llava-1.5-7b-hf", mesh)
    batch, model_cfg = encode(hf, image, "What is in the picture?")
    Generator(model_cfg, KVPolicy.of("skip_vision"), 16, mesh=mesh)(hf.params, batch)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh
from PIL import Image

from skipvision_jax import sharding
from skipvision_jax.config import FLOAT_DTYPES, LayoutConfig, ModelConfig, SkipConfig
from skipvision_jax.data.llava import Turn
from skipvision_jax.interop import hf_llava, llava_layout
from skipvision_jax.interop.hf_llava import HFCheckpointError
from skipvision_jax.nn.shapes import abstract_params


@dataclasses.dataclass
class HFLlava:
    directory: str
    hf_config: dict
    model_cfg: ModelConfig  # image_offset 0 until a prompt fixes it (see `encode`)
    params: dict
    unused: dict[str, np.ndarray]  # HF tensors our model does not run, kept for export
    processor: Any  # transformers processor, or None if the directory has none

    @property
    def image_token_id(self) -> int:
        return int(self.hf_config.get("image_token_index", self.hf_config.get("image_token_id", -1)))


def load_processor(directory: str):
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # weights-only directory: no tokenizer or image processor


def load_llava_layout_processor(directory: str, hf_config: dict, model_cfg: ModelConfig):
    """LLaVA's own layout keeps a tokenizer in the model directory and the
    image processor beside it (an export) or in the tower's directory
    (`mm_vision_tower`): both as one transformers LlavaProcessor, with the
    tokenizer's chat template; None where either is missing."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tower = hf_config.get("mm_vision_tower") or ""
        image_source = directory if os.path.exists(os.path.join(directory, "preprocessor_config.json")) else tower
        image_processor = AutoImageProcessor.from_pretrained(image_source)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if "<image>" not in tokenizer.get_vocab():  # LLaVA's code splices the image in by position instead
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return hf_llava.llava_processor(image_processor, tokenizer, model_cfg.vision)


def load(
    directory: str,
    mesh: Mesh | None = None,
    rules=sharding.DEFAULT_RULES,
    dtype: str = "auto",
    layout: LayoutConfig | None = None,
    skip: SkipConfig | None = None,
) -> HFLlava:
    """Reads a LLaVA directory, transformers' layout or LLaVA's own
    (interop/llava_layout.py); params go straight to their shardings on
    `mesh`, one tensor at a time. `dtype` "auto" holds the weights in the
    checkpoint's own dtype (transformers' dtype="auto") and computes in it
    (float16 weights compute in float32); float32 or bfloat16 holds and
    computes in that."""
    hf_config = hf_llava.read_config(directory)
    own_layout = llava_layout.is_llava_layout(hf_config)
    files = hf_llava.TensorFiles(directory, llava_layout.LLAVA_PREFIXES if own_layout else hf_llava.HF_PREFIXES)
    param_dtype = files.floating_dtype() if dtype == "auto" else dtype
    compute = param_dtype if param_dtype in FLOAT_DTYPES else "float32"
    if own_layout:
        model_cfg = llava_layout.model_config_from_llava(hf_config, directory, "summary.norm.weight" in files.names)
        model_cfg = dataclasses.replace(model_cfg, layout=layout or model_cfg.layout, skip=skip or model_cfg.skip)
        groups = llava_layout.LLAVA_GROUPS
    else:
        model_cfg = hf_llava.model_config_from_hf(hf_config, layout=layout, skip=skip)
        groups = hf_llava.HF_GROUPS
    model_cfg = dataclasses.replace(model_cfg, dtype=compute, param_dtype=param_dtype)
    params, unused = hf_llava.load_params(
        files, abstract_params(model_cfg, mesh, rules), groups=groups, keep_unused=True
    )
    processor = (
        load_llava_layout_processor(directory, hf_config, model_cfg) if own_layout else load_processor(directory)
    )
    if own_layout and processor is not None:
        hf_config = {**hf_config, "image_token_index": processor.tokenizer.convert_tokens_to_ids("<image>")}
    return HFLlava(directory, hf_config, model_cfg, params, unused, processor)


def chat_prompt(processor, conversation: str | Sequence[Turn]) -> str:
    """The directory's chat template around a conversation (a question: one
    user turn) whose first user turn opens with the image; LLaVA-1.5's
    `USER: <image>\\n... ASSISTANT:` (conv_vicuna_v1) when it has none."""
    turns = [Turn("user", conversation)] if isinstance(conversation, str) else list(conversation)
    first_user = next(i for i, turn in enumerate(turns) if turn.role == "user")
    if getattr(processor, "chat_template", None):
        messages = [
            {
                "role": turn.role,
                "content": ([{"type": "image"}] if i == first_user else []) + [{"type": "text", "text": turn.text}],
            }
            for i, turn in enumerate(turns)
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    prompt = ""
    for i, turn in enumerate(turns):
        if turn.role == "system":
            prompt += turn.text + " "
        elif turn.role == "user":
            image = processor.image_token + "\n" if i == first_user else ""
            prompt += f"USER: {image}{turn.text} ASSISTANT:"
        else:
            prompt += f" {turn.text}{processor.tokenizer.eos_token or ''}"
    return prompt


def split_image_tokens(input_ids: np.ndarray, image_token_id: int, num_features: int) -> tuple[np.ndarray, int]:
    """HF ids with the image placeholder run -> (text ids without it, its offset)."""
    is_image = input_ids == image_token_id
    positions = np.flatnonzero(is_image)
    if len(positions) != num_features or (len(positions) and positions[-1] - positions[0] + 1 != num_features):
        raise HFCheckpointError(
            f"prompt: expected one run of {num_features} image tokens (id {image_token_id}), found {len(positions)}"
        )
    return input_ids[~is_image], int(positions[0])


def from_hf_inputs(
    hf: HFLlava, input_ids: np.ndarray, pixel_values: np.ndarray
) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """transformers' inputs for one prompt (ids [T] with the image token run,
    pixels [1, C, H, W]) as our batch of 1, and the config whose layout puts
    the image where the run was."""
    text_ids, offset = split_image_tokens(input_ids, hf.image_token_id, hf.model_cfg.vision.num_features)
    pixels = pixel_values.transpose(0, 2, 3, 1).astype(np.float32)  # NCHW -> NHWC
    layout = dataclasses.replace(hf.model_cfg.layout, image_offset=offset)
    batch = {
        "input_ids": text_ids[None].astype(np.int32),
        "text_mask": np.ones((1, len(text_ids)), bool),
        "pixels": pixels,
    }
    return batch, dataclasses.replace(hf.model_cfg, layout=layout)


def encode(
    hf: HFLlava, image: Image.Image, conversation: str | Sequence[Turn]
) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """One prompt (a question, or a conversation) through the directory's processor (see `from_hf_inputs`)."""
    if hf.processor is None:
        raise HFCheckpointError(f"{hf.directory}: no tokenizer/processor files, cannot encode a prompt")
    inputs = hf.processor(images=image, text=chat_prompt(hf.processor, conversation), return_tensors="np")
    limit = max_positions(hf)
    if len(inputs["input_ids"][0]) > limit:
        raise HFCheckpointError(
            f"prompt: {len(inputs['input_ids'][0])} tokens with the image exceed max_position_embeddings={limit}"
        )
    return from_hf_inputs(hf, inputs["input_ids"][0], inputs["pixel_values"])


def _text_config(hf: HFLlava) -> dict:
    """The language model's config: transformers nests it, LLaVA's own layout is one at the top level."""
    return hf.hf_config.get("text_config") or hf.hf_config


def max_positions(hf: HFLlava) -> int:
    """Tokens a sequence may hold, the image's included (transformers' default when unset)."""
    return int(_text_config(hf).get("max_position_embeddings") or 2048)


def stop_ids(hf: HFLlava) -> tuple[int, ...]:
    eos = _text_config(hf).get("eos_token_id")
    if hf.processor is not None and hf.processor.tokenizer.eos_token_id is not None:
        eos = hf.processor.tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
