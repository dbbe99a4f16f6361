"""Hugging Face `LlavaForConditionalGeneration` checkpoints in and out.

A directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Tensor names come in several layouts across
transformers versions (`language_model.model.*`, `model.language_model.*`,
`vision_tower.vision_model.*`, ...); they are normalized to four groups
(`vision.`, `projector.`, `text.`, `lm_head.`) and mapped to our parameter
tree by one table, `_RULES`, used in both directions.

Loading reads one tensor at a time on the host and places it straight into
its sharding (`jax.make_array_from_callback`): no device ever receives more
than its shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from skipvision_jax.config import (
    DecoderConfig,
    LayoutConfig,
    ModelConfig,
    SkipConfig,
    VisionConfig,
)


class HFCheckpointError(ValueError):
    """A Hugging Face directory we cannot read or represent; the message names the file or field."""


# ---------------------------------------------------------------- config


def _rope(text: dict) -> tuple[float, tuple[float, float, float, int] | None]:
    """RoPE base and Llama 3.1 scaling from either config style (v4
    `rope_theta` + `rope_scaling`, v5 `rope_parameters`)."""
    params = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in params]
        if missing:
            raise HFCheckpointError(f"text_config.rope_scaling: llama3 scaling lacks {missing}")
        return theta, (
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    raise HFCheckpointError(
        f"text_config.rope_scaling: rope type {rope_type!r} is not supported (plain and llama3 RoPE are)"
    )


def _expect(config: dict, key: str, allowed: tuple, where: str, default: Any = None) -> Any:
    value = config.get(key, default)
    if value not in allowed:
        raise HFCheckpointError(f"{where}{key}: {value!r} is not supported (expected one of {allowed})")
    return value


def vision_config_from_hf(vision: dict, feature_layer: Any = -2, strategy: Any = "default") -> VisionConfig:
    """Our tower config for a transformers CLIP vision config (`vision_config`
    of a LLaVA or CLIPModel config.json, or a CLIPVisionModel's own)."""
    _expect(vision, "model_type", ("clip_vision_model",), "vision_config.", "clip_vision_model")
    act = _expect(vision, "hidden_act", ("quick_gelu", "gelu"), "vision_config.", "quick_gelu")
    if not isinstance(feature_layer, int):
        raise HFCheckpointError(f"vision_feature_layer: {feature_layer!r} is not supported (one layer only)")
    _expect({"vision_feature_select_strategy": strategy}, "vision_feature_select_strategy", ("default", "full"), "")
    return VisionConfig(
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        num_channels=vision.get("num_channels", 3),
        width=vision["hidden_size"],
        depth=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        mlp_dim=vision["intermediate_size"],
        quick_gelu=act == "quick_gelu",
        layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
        select_layer=feature_layer,
        select_strategy="patch" if strategy == "default" else "full",
    )


def decoder_config_from_hf(text: dict, tie_embeddings: bool | None = None) -> DecoderConfig:
    """Our decoder config for a transformers Llama config (`text_config` of a
    LLaVA config.json, or a LlamaForCausalLM's own)."""
    _expect(text, "model_type", ("llama",), "text_config.", "llama")
    _expect(text, "hidden_act", ("silu",), "text_config.", "silu")
    _expect(text, "attention_bias", (False,), "text_config.", False)
    _expect(text, "mlp_bias", (False,), "text_config.", False)
    width = text["hidden_size"]
    heads = text["num_attention_heads"]
    rope_theta, rope_scaling = _rope(text)
    return DecoderConfig(
        vocab_size=text["vocab_size"],
        width=width,
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or width // heads,
        mlp_dim=text["intermediate_size"],
        rope_theta=rope_theta,
        rope_llama3_scaling=rope_scaling,
        norm_eps=text.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(text.get("tie_word_embeddings", False) if tie_embeddings is None else tie_embeddings),
    )


def model_config_from_hf(
    hf: dict, layout: LayoutConfig | None = None, skip: SkipConfig | None = None, dtype: str = "float32"
) -> ModelConfig:
    """Our ModelConfig for a LLaVA config.json. By default the layout keeps
    every visual token and Skip-FFN is off: the same computation as transformers."""
    _expect(hf, "model_type", ("llava",), "")
    _expect(hf, "projector_hidden_act", ("gelu",), "", "gelu")
    _expect(hf, "multimodal_projector_bias", (True,), "", True)
    text = hf.get("text_config") or {}
    vision_cfg = vision_config_from_hf(
        hf.get("vision_config") or {},
        hf.get("vision_feature_layer", -2),
        hf.get("vision_feature_select_strategy", "default"),
    )
    decoder_cfg = decoder_config_from_hf(text, hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    layout = layout or LayoutConfig.plain(vision_cfg.num_features)
    return ModelConfig(
        vision=vision_cfg, layout=layout, skip=skip or SkipConfig(enabled=False), decoder=decoder_cfg, dtype=dtype
    )


def vision_config_to_hf(v: VisionConfig, base: dict | None = None) -> dict:
    """A transformers CLIP vision config for our tower (`base` keeps fields we do not model)."""
    return {
        **(base or {}),
        "model_type": "clip_vision_model",
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "hidden_size": v.width,
        "num_hidden_layers": v.depth,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.mlp_dim,
        "hidden_act": "quick_gelu" if v.quick_gelu else "gelu",
        "layer_norm_eps": v.layer_norm_eps,
    }


def decoder_config_to_hf(d: DecoderConfig, base: dict | None = None) -> dict:
    """A transformers Llama config for our decoder (`base` keeps fields we do
    not model, and its RoPE style: v4 `rope_theta` or v5 `rope_parameters`)."""
    text = {
        **(base or {}),
        "model_type": "llama",
        "vocab_size": d.vocab_size,
        "hidden_size": d.width,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_dim": d.resolved_head_dim,
        "intermediate_size": d.mlp_dim,
        "rms_norm_eps": d.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": d.tie_embeddings,
    }
    text.pop("rope_scaling", None)
    rope = {"rope_type": "default", "rope_theta": d.rope_theta}
    if d.rope_llama3_scaling is not None:
        factor, low, high, original = d.rope_llama3_scaling
        rope.update(
            rope_type="llama3",
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=original,
        )
    if "rope_parameters" in text or "rope_theta" not in text or d.rope_llama3_scaling is not None:
        text.pop("rope_theta", None)
        text["rope_parameters"] = rope
    else:
        text["rope_theta"] = d.rope_theta
    return text


def hf_config_from_model(cfg: ModelConfig, image_token_id: int, base: dict | None = None) -> dict:
    """A LLaVA config.json for our config (`base`, the imported one, keeps fields we do not model)."""
    if cfg.vision.pooled_grids or not cfg.layout.is_plain(cfg.vision.num_features):
        raise HFCheckpointError(
            "layout: only the plain LLaVA layout (every visual token kept, no merge, no summary tokens, no pooled grids) exists in transformers"
        )
    if cfg.skip.enabled and cfg.skip.partition == "topk":
        raise HFCheckpointError("skip.partition: the topk router has no transformers counterpart")
    hf = json.loads(json.dumps(base or {}))
    hf["vision_config"] = vision_config_to_hf(cfg.vision, hf.get("vision_config"))
    hf["text_config"] = decoder_config_to_hf(cfg.decoder, hf.get("text_config"))
    v, d = cfg.vision, cfg.decoder
    hf.update(
        model_type="llava",
        architectures=["LlavaForConditionalGeneration"],
        image_token_index=image_token_id,
        vision_feature_layer=v.select_layer,
        vision_feature_select_strategy=select_strategy(v),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=d.tie_embeddings,
        image_seq_length=v.num_features,
    )
    return hf


def select_strategy(vision: VisionConfig) -> str:
    """transformers' `vision_feature_select_strategy` for our tower's: "default"
    drops the CLS position, "full" keeps it."""
    return "default" if vision.select_strategy == "patch" else "full"


def llava_processor(image_processor, tokenizer, vision: VisionConfig):
    """transformers' LlavaProcessor over our tower's geometry, with the tokenizer's chat template."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=select_strategy(vision),
        num_additional_image_tokens=1,  # the CLS position, which "default" drops again
        chat_template=tokenizer.chat_template,
    )


# ---------------------------------------------------------------- tensors

# Prefixes of every known transformers layout -> our four groups (longest first).
HF_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
# The layout the hub's llava-hf checkpoints and transformers < 5.3 write
# (save_pretrained), which every 5.x release loads; for export.
_EXPORT_PREFIXES = {
    "vision.": "vision_tower.vision_model.",
    "projector.": "multi_modal_projector.",
    "text.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}


# The parts LLaVA trains from, as they ship: a transformers LlamaForCausalLM,
# a CLIPVisionModel or CLIPModel (its text half unused), and LLaVA's
# pretrain-stage `mm_projector.bin` (keys `model.mm_projector.{0,2}.*`, the two
# Linear layers of `nn.Sequential(Linear, GELU, Linear)`).
LANGUAGE_MODEL_PREFIXES = (("model.", "text."), ("lm_head.", "lm_head."))
# transformers up to 5.x saved a CLIPVisionModel's keys under `vision_model.`;
# later releases save them bare (`embeddings.`, `encoder.`, ...).
VISION_TOWER_PREFIXES = (("vision_model.", "vision."), ("", "vision."))
PROJECTOR_PREFIXES = (
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
)
# Every group a LlavaForConditionalGeneration directory holds.
HF_GROUPS = ("vision.", "projector.", "text.", "lm_head.")


def normalize_name(name: str, prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES) -> str:
    for prefix, group in prefixes:
        if name.startswith(prefix):
            return group + name[len(prefix) :]
    return name


def export_name(normalized: str, names: dict[str, str] = _EXPORT_PREFIXES) -> str:
    """The inverse of `normalize_name`: our group -> a layout's prefix (default transformers' own save layout)."""
    for group, prefix in names.items():
        if normalized.startswith(group):
            return prefix + normalized[len(group) :]
    return normalized


@dataclasses.dataclass(frozen=True)
class _Rule:
    hf: str  # normalized name, `{i}` for the layer
    ours: str  # path in our params, "/"-separated
    # "linear": HF [out, in] <-> our [in, out...]; "linear2": our [in1, in2, out]
    # (o_proj); "conv": [out, in, kh, kw] <-> [kh, kw, in, out]; "bias": [out]
    # <-> [heads, head_dim]; "vector": same shape.
    kind: str


_RULES = (
    _Rule("vision.embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
    _Rule("vision.embeddings.class_embedding", "vision/class_embed", "vector"),
    _Rule("vision.embeddings.position_embedding.weight", "vision/pos_embed", "vector"),
    _Rule("vision.pre_layrnorm.weight", "vision/pre_norm/norm/scale", "vector"),
    _Rule("vision.pre_layrnorm.bias", "vision/pre_norm/norm/bias", "vector"),
    *(
        _Rule(f"vision.encoder.layers.{{i}}.{hf}", f"vision/layer_{{i}}/{ours}", kind)
        for hf, ours, kind in (
            ("layer_norm1.weight", "ln1/norm/scale", "vector"),
            ("layer_norm1.bias", "ln1/norm/bias", "vector"),
            ("layer_norm2.weight", "ln2/norm/scale", "vector"),
            ("layer_norm2.bias", "ln2/norm/bias", "vector"),
            ("self_attn.q_proj.weight", "attn/q_proj/kernel", "linear"),
            ("self_attn.q_proj.bias", "attn/q_proj/bias", "bias"),
            ("self_attn.k_proj.weight", "attn/k_proj/kernel", "linear"),
            ("self_attn.k_proj.bias", "attn/k_proj/bias", "bias"),
            ("self_attn.v_proj.weight", "attn/v_proj/kernel", "linear"),
            ("self_attn.v_proj.bias", "attn/v_proj/bias", "bias"),
            ("self_attn.out_proj.weight", "attn/o_proj/kernel", "linear2"),
            ("self_attn.out_proj.bias", "attn/o_proj/bias", "vector"),
            ("mlp.fc1.weight", "fc1/kernel", "linear"),
            ("mlp.fc1.bias", "fc1/bias", "vector"),
            ("mlp.fc2.weight", "fc2/kernel", "linear"),
            ("mlp.fc2.bias", "fc2/bias", "vector"),
        )
    ),
    _Rule("projector.linear_1.weight", "visual_tokens/projector/linear_1/kernel", "linear"),
    _Rule("projector.linear_1.bias", "visual_tokens/projector/linear_1/bias", "vector"),
    _Rule("projector.linear_2.weight", "visual_tokens/projector/linear_2/kernel", "linear"),
    _Rule("projector.linear_2.bias", "visual_tokens/projector/linear_2/bias", "vector"),
    # The official Skip-Vision model's one summary pool, `ada = Sequential(LayerNorm, Linear(d, 1))`
    # (interop/llava_layout.py; transformers' LLaVA has none).
    _Rule("summary.norm.weight", "visual_tokens/summary/norm/norm/scale", "vector"),
    _Rule("summary.norm.bias", "visual_tokens/summary/norm/norm/bias", "vector"),
    _Rule("summary.score.weight", "visual_tokens/summary/score/kernel", "linear"),
    _Rule("summary.score.bias", "visual_tokens/summary/score/bias", "vector"),
    _Rule("text.embed_tokens.weight", "embed/embedding", "vector"),
    *(
        _Rule(f"text.layers.{{i}}.{hf}", f"decoder/layer_{{i}}/{ours}", kind)
        for hf, ours, kind in (
            ("input_layernorm.weight", "attn_norm/scale", "vector"),
            ("post_attention_layernorm.weight", "mlp_norm/scale", "vector"),
            ("self_attn.q_proj.weight", "attn/q_proj/kernel", "linear"),
            ("self_attn.k_proj.weight", "attn/k_proj/kernel", "linear"),
            ("self_attn.v_proj.weight", "attn/v_proj/kernel", "linear"),
            ("self_attn.o_proj.weight", "attn/o_proj/kernel", "linear2"),
            ("mlp.gate_proj.weight", "mlp/gate/kernel", "linear"),
            ("mlp.up_proj.weight", "mlp/up/kernel", "linear"),
            ("mlp.down_proj.weight", "mlp/down/kernel", "linear"),
        )
    ),
    _Rule("text.norm.weight", "final_norm/scale", "vector"),
    _Rule("lm_head.weight", "lm_head/kernel", "linear"),
)


def _to_ours(value: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
        value = value.transpose(2, 3, 1, 0)
    elif kind in ("linear", "linear2"):
        value = value.T
    if value.size != int(np.prod(shape)):
        raise ValueError(f"has {value.size} elements, expected {int(np.prod(shape))}")
    return value.reshape(shape)


def _to_hf(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return value.transpose(3, 2, 0, 1)
    if kind == "linear":  # [in, out...] -> [out, in]
        return value.reshape(value.shape[0], -1).T
    if kind == "linear2":  # [in1, in2, out] -> [out, in1 * in2]
        return value.reshape(-1, value.shape[-1]).T
    if kind == "bias":  # [heads, head_dim] -> [heads * head_dim]
        return value.reshape(-1)
    return value


def _expand_rules(params_paths: set[str]) -> Iterator[tuple[str, str, str]]:
    """(normalized HF name, our path, kind) for every parameter our model has."""
    for rule in _RULES:
        if "{i}" not in rule.ours:
            if rule.ours in params_paths:
                yield rule.hf, rule.ours, rule.kind
            continue
        i = 0
        while rule.ours.format(i=i) in params_paths:
            yield rule.hf.format(i=i), rule.ours.format(i=i), rule.kind
            i += 1


# A checkpoint's tensor dtypes (safetensors' names and torch's) -> ours.
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_TORCH_FLOAT_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class TensorFiles:
    """Names -> tensors of one checkpoint, read one at a time: a directory
    (single file or sharded safetensors) or one `.safetensors` / PyTorch `.bin`
    file. Names are normalized to our groups by `prefixes`.

    Host memory stays near one tensor: a safetensors file is opened (and its
    memory map dropped) per tensor read, so the pages read do not stay in the
    process; a `.bin` shard stays mapped until `release` (the loader reads
    shard by shard)."""

    def __init__(self, path: str, prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES):
        self.path = path
        self._torch: dict[str, dict] = {}  # .bin files, memory-mapped by torch
        self.names: dict[str, tuple[str, str]] = {}  # normalized -> (file, original name)
        self.dtypes: dict[str, str] = {}  # normalized -> the stored dtype's name
        for file in self._checkpoint_files(path):
            if file.endswith(".bin"):
                state = self._torch[file] = _torch_state_dict(file)
                stored = {name: str(value.dtype) for name, value in state.items()}
            else:
                with _open_safetensors(file) as handle:
                    stored = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
            for name, dtype in stored.items():
                normalized = normalize_name(name, prefixes)
                self.names[normalized] = (file, name)
                self.dtypes[normalized] = _FLOAT_DTYPES.get(dtype) or _TORCH_FLOAT_DTYPES.get(dtype, dtype)

    def floating_dtype(self) -> str:
        """The dtype the checkpoint's weights are stored in (that of most of its
        floating-point tensors), as transformers' dtype="auto" reads it."""
        counts: dict[str, int] = {}
        for dtype in self.dtypes.values():
            if dtype in _FLOAT_DTYPES.values():
                counts[dtype] = counts.get(dtype, 0) + 1
        if not counts:
            raise HFCheckpointError(f"{self.path}: no floating-point tensor")
        return max(counts, key=counts.get)

    @staticmethod
    def _checkpoint_files(path: str) -> list[str]:
        """The files of a checkpoint: safetensors first, else PyTorch's .bin
        (LLaVA's own releases ship `pytorch_model-*.bin` shards)."""
        if os.path.isfile(path):
            if not path.endswith((".safetensors", ".bin")):
                raise HFCheckpointError(f"{path}: expected a .safetensors or .bin file")
            return [path]
        for single, index in (
            ("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"),
        ):
            index_path = os.path.join(path, index)
            if os.path.exists(index_path):
                try:
                    files = sorted(set(json.load(open(index_path))["weight_map"].values()))
                except (json.JSONDecodeError, KeyError) as err:
                    raise HFCheckpointError(f"{index_path}: not a checkpoint index ({err})") from None
                missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
                if missing:
                    raise HFCheckpointError(f"{path}: missing shard(s) {missing} listed in {index}")
                return [os.path.join(path, f) for f in files]
            if os.path.exists(os.path.join(path, single)):
                return [os.path.join(path, single)]
        raise HFCheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")

    def read(self, normalized: str) -> np.ndarray:
        """One tensor in its stored dtype (bfloat16 as ml_dtypes' numpy type)."""
        file, name = self.names[normalized]
        if file in self._torch:  # a PyTorch state dict, memory-mapped: convert this tensor only
            value = self._torch[file][name]
            if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16: reinterpret its bits
                import torch

                return value.view(torch.int16).numpy().view(jnp.bfloat16)
            return value.numpy()
        # Read on the host CPU (safetensors' numpy reader has no bfloat16).
        with _open_safetensors(file) as handle, jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(handle.get_tensor(name))

    def release(self, file: str) -> None:
        """Drops a `.bin` shard's memory map once its tensors are read."""
        self._torch.pop(file, None)


def _open_safetensors(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="flax")
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise HFCheckpointError(f"{path}: unreadable safetensors file ({err})") from None


def _torch_state_dict(path: str) -> dict:
    """A PyTorch state dict file (LLaVA's `mm_projector.bin`, its model
    shards), memory-mapped: tensors are read when `TensorFiles.read` asks."""
    try:
        import torch
    except ImportError:
        raise HFCheckpointError(f"{path}: reading a .bin file needs PyTorch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        raise HFCheckpointError(f"{path}: not a PyTorch state dict ({err})") from None
    if not isinstance(state, dict):
        raise HFCheckpointError(f"{path}: not a PyTorch state dict (a {type(state).__name__})")
    return state


def load_params(
    directory: str | TensorFiles,
    abstract_params: dict,
    strict: bool = True,
    groups: tuple[str, ...] = HF_GROUPS,
    prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES,
    keep_unused: bool = False,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Our params (shaped and sharded as `abstract_params`, ShapeDtypeStructs
    with shardings) from a checkpoint (`TensorFiles`: its names normalized by
    `prefixes`), and its tensors our model does not use (vision layers after
    the selected one, the vision post-norm), kept for export.

    Only the `groups` the checkpoint holds are read (a language model has no
    tower): each of their tensors must be there and fit, or the error names it
    and its file. Parameters of ours outside them (summary pools, routers, the
    other parts) are an error when `strict`, else left out (see `merge_into`)."""
    files = directory if isinstance(directory, TensorFiles) else TensorFiles(directory, prefixes)
    directory = files.path
    flat_abstract = traverse_util.flatten_dict(abstract_params, sep="/")
    wanted = [rule for rule in _expand_rules(set(flat_abstract)) if rule[0].startswith(groups)]
    for hf_name, path, _ in wanted:
        if hf_name not in files.names:
            raise HFCheckpointError(f"{directory}: tensor {hf_name!r} (for {path}) is missing")
    loaded, unused = {}, {}
    ours = {hf_name: (path, kind) for hf_name, path, kind in wanted}
    # Shard by shard, so that a .bin shard's map is dropped once its tensors are read.
    for file in dict.fromkeys(f for f, _ in files.names.values()):
        for name in [n for n, (f, _) in files.names.items() if f == file]:
            if name not in ours:  # not run (e.g. tower layers after the feature layer)
                if keep_unused and not _is_tied_head(name, abstract_params):
                    unused[files.names[name][1]] = files.read(name)
                continue
            path, kind = ours[name]
            loaded[path] = _placed(files, name, path, kind, flat_abstract[path])
        files.release(file)
    missing = sorted(set(flat_abstract) - set(loaded))
    if missing and strict:
        raise HFCheckpointError(
            f"{directory}: no tensor for our parameter(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}"
        )
    return traverse_util.unflatten_dict(loaded, sep="/"), unused


def _placed(files: TensorFiles, name: str, path: str, kind: str, target) -> jax.Array:
    """One checkpoint tensor in our layout and `target`'s dtype, placed in its sharding."""
    value = files.read(name)
    try:
        value = _to_ours(value, kind, target.shape).astype(target.dtype, copy=False)
    except ValueError as err:
        raise HFCheckpointError(
            f"{files.names[name][0]}: tensor {files.names[name][1]} of shape {list(value.shape)} does not fit {path} {list(target.shape)}: {err}"
        ) from None
    sharding = getattr(target, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(target.shape, sharding, lambda index: value[index])


def _is_tied_head(normalized: str, params: dict) -> bool:
    return normalized == "lm_head.weight" and "lm_head" not in params


def export_tensors(
    params: dict,
    unused: dict[str, np.ndarray] | None = None,
    names: dict[str, str] = _EXPORT_PREFIXES,
    prefixes: tuple[tuple[str, str], ...] = HF_PREFIXES,
) -> Iterator[tuple[str, np.ndarray]]:
    """Checkpoint tensors for our params, one at a time (each made from its
    weight when asked for), named by `names` (our group -> the layout's prefix;
    default transformers' own save layout), then `unused` (named as `prefixes`
    reads them) passed through."""
    flat = traverse_util.flatten_dict(params, sep="/")
    written = set()
    for hf_name, path, kind in _expand_rules(set(flat)):
        name = export_name(hf_name, names)
        written.add(name)
        yield name, np.ascontiguousarray(_to_hf(np.asarray(jax.device_get(flat[path])), kind))
    for name, value in (unused or {}).items():
        name = export_name(normalize_name(name, prefixes), names)
        if name not in written:
            yield name, value


SHARD_BYTES = 2 * 2**30


def write_safetensors(
    directory: str, tensors: Iterable[tuple[str, np.ndarray]], shard_bytes: int = SHARD_BYTES
) -> None:
    """`model.safetensors`, or, past `shard_bytes`, shards
    `model-0000i-of-0000n.safetensors` with transformers' index
    (`model.safetensors.index.json`): one shard's tensors in memory at a time."""
    from safetensors.numpy import save_file

    shards: list[tuple[str, list[str]]] = []
    current: dict[str, np.ndarray] = {}
    total = in_shard = 0

    def flush() -> None:
        path = os.path.join(directory, f"shard-{len(shards):05d}.tmp")
        save_file(current, path, metadata={"format": "pt"})
        shards.append((path, list(current)))
        current.clear()

    for name, value in tensors:
        if current and in_shard + value.nbytes > shard_bytes:
            flush()
            in_shard = 0
        current[name] = value
        in_shard += value.nbytes
        total += value.nbytes
    flush()
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(directory, "model.safetensors"))
        return
    weight_map = {}
    for i, (path, tensor_names) in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, os.path.join(directory, file))
        weight_map.update(dict.fromkeys(tensor_names, file))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def identity_tail(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """For a model we trained: the vision post-norm transformers expects but never uses for LLaVA features."""
    return {
        "vision_tower.post_layernorm.weight": np.ones(cfg.vision.width, np.float32),
        "vision_tower.post_layernorm.bias": np.zeros(cfg.vision.width, np.float32),
    }


def save(
    directory: str,
    params: dict,
    cfg: ModelConfig,
    image_token_id: int,
    base_config: dict | None = None,
    unused: dict[str, np.ndarray] | None = None,
) -> None:
    """Writes config.json + model.safetensors (sharded past `SHARD_BYTES`)
    that transformers loads as LlavaForConditionalGeneration."""
    hf = hf_config_from_model(cfg, image_token_id, base_config)
    if unused is None:
        # Only the layers up to the selected one exist here: export a tower of
        # exactly that depth, selecting its last hidden state (the same feature).
        unused = identity_tail(cfg)
        hf["vision_config"]["num_hidden_layers"] = cfg.vision.layers_used
        hf["vision_feature_layer"] = -1
    os.makedirs(directory, exist_ok=True)
    write_safetensors(directory, export_tensors(params, unused))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise HFCheckpointError(f"{directory}: no config.json")
    try:
        return json.load(open(path))
    except json.JSONDecodeError as err:
        raise HFCheckpointError(f"{path}: not JSON ({err})") from None


def merge_into(fresh: dict, imported: dict) -> dict:
    """`fresh` params with every leaf `imported` has replaced (for fine-tuning
    with parts transformers lacks: summary tokens, routers)."""
    flat_fresh, flat_imported = (
        traverse_util.flatten_dict(fresh, sep="/"),
        traverse_util.flatten_dict(imported, sep="/"),
    )
    return traverse_util.unflatten_dict(
        {path: flat_imported.get(path, value) for path, value in flat_fresh.items()}, sep="/"
    )
