"""Typed model configuration with validation at build time.

Every config is a frozen dataclass; `__post_init__` checks the values and
raises a one-line `ValueError` naming the offending field, so a bad config
fails when it is built, never deep inside a traced function.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

PARTITION_KINDS = ("positional", "topk")
FLOAT_DTYPES = ("float32", "bfloat16")  # compute
PARAM_DTYPES = (*FLOAT_DTYPES, "float16")  # weights: also as fp16 checkpoints (LLaVA-1.5's) ship
SELECT_STRATEGIES = ("patch", "full")
POS_EMBED_INITS = ("sincos2d", "normal")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


def _require_positive(cfg: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(isinstance(value, int) and value > 0, f"{prefix}.{name}", f"must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP-style ViT. The LLaVA feature is the hidden state after `select_layer`."""

    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    quick_gelu: bool = True
    layer_norm_eps: float = 1e-5
    # Index into the hidden states [embeddings, layer 1, ..., layer depth], as in
    # Hugging Face `vision_feature_layer`; LLaVA uses -2 (the penultimate layer).
    select_layer: int = -2
    # "patch" drops the class token (LLaVA's "default"), "full" keeps it.
    select_strategy: str = "patch"
    # Multi-scale layout: for each g, g x g average-pooled copies of the patch
    # grid go before the patch tokens (coarse first, as in the paper's
    # 16 + 256 + 1024 layout: pooled_grids=(4, 16) over 32 x 32 patches).
    pooled_grids: tuple[int, ...] = ()
    # Initial position embedding: "sincos2d" (a 2-D sine-cosine table, as MAE
    # and big_vision start from) or "normal" (std 0.02). Trained from scratch on
    # the embedded task, a linear probe reads an object token's column from the
    # tower output at 100% with the table, 94% from the normal start. Imported
    # towers overwrite it.
    pos_embed_init: str = "sincos2d"

    def __post_init__(self):
        _require_positive(
            self, "vision", "image_size", "patch_size", "num_channels", "width", "depth", "num_heads", "mlp_dim"
        )
        _require(
            self.image_size % self.patch_size == 0,
            "vision.patch_size",
            f"{self.patch_size} does not divide image_size {self.image_size}",
        )
        _require(
            self.width % self.num_heads == 0, "vision.num_heads", f"{self.num_heads} does not divide width {self.width}"
        )
        _require(
            -(self.depth + 1) <= self.select_layer <= self.depth,
            "vision.select_layer",
            f"{self.select_layer} is outside [-{self.depth + 1}, {self.depth}]",
        )
        _require(
            self.select_strategy in SELECT_STRATEGIES,
            "vision.select_strategy",
            f"unknown {self.select_strategy!r}, expected one of {SELECT_STRATEGIES}",
        )
        _require(
            self.pos_embed_init in POS_EMBED_INITS,
            "vision.pos_embed_init",
            f"unknown {self.pos_embed_init!r}, expected one of {POS_EMBED_INITS}",
        )
        object.__setattr__(self, "pooled_grids", tuple(self.pooled_grids))
        for grid in self.pooled_grids:
            _require(
                isinstance(grid, int) and grid > 0 and self.patch_grid % grid == 0,
                "vision.pooled_grids",
                f"{grid} does not divide the {self.patch_grid} x {self.patch_grid} patch grid",
            )

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patch_grid**2

    @property
    def num_features(self) -> int:
        """Visual tokens handed to the projector."""
        pooled = sum(grid * grid for grid in self.pooled_grids)
        return pooled + self.num_patches + (1 if self.select_strategy == "full" else 0)

    @property
    def layers_used(self) -> int:
        """Encoder layers that must run to produce the selected hidden state."""
        return self.select_layer % (self.depth + 1)


LAYOUT_SELECTIONS = ("first", "cls_attention")
MERGE_METHODS = ("official", "tome")  # nn/token_merge.py
SUMMARY_POOLS = ("shared", "separate")
# The official code's LLaVA setting (zwl666666/Skip-Vision): 100 of 576 tokens
# kept by the CLS token's attention (clip_encoder.py lines 88-106, use_zip), the
# other 476 merged to 156 (llava_arch_index_q_tome.py line 535), one `ada` pool.
OFFICIAL_LLAVA_LAYOUT = {
    "num_kept": 100,
    "select": "cls_attention",
    "merge_to": 156,
    "merge_method": "official",
    "summary_tokens": True,
    "summary_pool": "shared",
}


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Where the visual tokens go: `[prefix | kept | q1 | skipped | q2 | text]`."""

    # Text tokens before the visual block (a chat template's fixed prefix).
    image_offset: int = 0
    # `num_kept` visual tokens are kept; the rest are the fine tokens. Which:
    # "first" (by position), or "cls_attention": the top num_kept by the CLS
    # token's attention to the patches at the feature layer, mean over heads,
    # kept in image order (VisionZip's dominant tokens, `use_zip` in the
    # official Skip-Vision clip_encoder.py).
    num_kept: int = 4
    select: str = "first"
    # Fine tokens after token merging; None keeps them all.
    merge_to: int | None = None
    # How they merge (nn/token_merge.py): "official", the official code's
    # one-round RandomBipartiteSoftMatching (output in its redundancy order),
    # or "tome", ToMe's size-weighted bipartite rounds (image order). The
    # default is what checkpoints written before the choice existed used.
    merge_method: str = "tome"
    # Insert the learned summary tokens q1 (after kept) and q2 (after skipped).
    summary_tokens: bool = True
    # Their softmax pools: "shared", one pool for q1 and q2 as the official
    # model's `self.ada`, or "separate", one each (again the older default).
    summary_pool: str = "separate"
    # The pruning baseline: the fine tokens never enter the sequence (a
    # fixed-budget pruner that keeps the coarse tokens); no skipped segment.
    drop_fine: bool = False

    @classmethod
    def plain(cls, num_visual: int, image_offset: int = 0) -> LayoutConfig:
        """Plain LLaVA: every visual token kept, no merge, no summary tokens."""
        return cls(image_offset=image_offset, num_kept=num_visual, merge_to=None, summary_tokens=False)

    def is_plain(self, num_visual: int) -> bool:
        """Whether this computes plain LLaVA (the merge and pool choices then do nothing)."""
        return self.num_kept == num_visual and self.merge_to is None and not self.summary_tokens and not self.drop_fine

    def __post_init__(self):
        _require(
            isinstance(self.image_offset, int) and self.image_offset >= 0,
            "layout.image_offset",
            f"must be >= 0, got {self.image_offset!r}",
        )
        _require(
            isinstance(self.num_kept, int) and self.num_kept >= 0,
            "layout.num_kept",
            f"must be >= 0, got {self.num_kept!r}",
        )
        _require(
            self.merge_to is None or (isinstance(self.merge_to, int) and self.merge_to >= 0),
            "layout.merge_to",
            f"must be None or >= 0, got {self.merge_to!r}",
        )
        _require(
            self.select in LAYOUT_SELECTIONS,
            "layout.select",
            f"unknown {self.select!r}, expected one of {LAYOUT_SELECTIONS}",
        )
        _require(
            self.merge_method in MERGE_METHODS,
            "layout.merge_method",
            f"unknown {self.merge_method!r}, expected one of {MERGE_METHODS}",
        )
        _require(
            self.summary_pool in SUMMARY_POOLS,
            "layout.summary_pool",
            f"unknown {self.summary_pool!r}, expected one of {SUMMARY_POOLS}",
        )
        _require(
            not (self.drop_fine and self.merge_to is not None),
            "layout.drop_fine",
            "the fine tokens are dropped, so there is nothing to merge; set merge_to to None",
        )


@dataclasses.dataclass(frozen=True)
class SkipConfig:
    """Skip-FFN: which decoder layers skip the FFN for which visual tokens."""

    enabled: bool = True
    partition: str = "positional"
    layer_start: int = 0
    # Exclusive; -1 means through the last layer.
    layer_end: int = -1
    # Whether the rows after q2 (text, answer) attend to the skipped rows, in
    # training and prefill. True: the newest official variants (plain causal
    # mask), whose skip KV cache then drops keys the text was trained to read.
    # False: the older `*_pass_last_sdpa_pass_o.py` variants, which hide them,
    # so the skip_vision cache is exact (q2 still reads them and carries them on).
    text_sees_skipped: bool = True

    def __post_init__(self):
        _require(
            self.partition in PARTITION_KINDS,
            "skip.partition",
            f"unknown partition kind {self.partition!r}, expected one of {PARTITION_KINDS}",
        )
        _require(self.layer_start >= 0, "skip.layer_start", f"must be >= 0, got {self.layer_start}")


@dataclasses.dataclass(frozen=True)
class FastVConfig:
    """The FastV-style pruning baseline (Chen et al. 2024), applied at prefill:
    after the first `layer` decoder layers, only the `keep` visual tokens that
    received the most attention from the last prompt token stay in the
    sequence (and in the cache) of the remaining layers. `layer` 0: off."""

    layer: int = 0
    keep: int = 0

    @property
    def enabled(self) -> bool:
        return self.layer > 0

    def __post_init__(self):
        _require(
            isinstance(self.layer, int) and self.layer >= 0, "fastv.layer", f"must be >= 0 (0: off), got {self.layer!r}"
        )
        _require(
            not self.enabled or (isinstance(self.keep, int) and self.keep > 0),
            "fastv.keep",
            f"must be > 0 with fastv.layer set, got {self.keep!r}",
        )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """LLaMA-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    vocab_size: int = 64
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    mlp_dim: int = 128
    rope_theta: float = 10000.0
    # Llama 3.1's RoPE frequency scaling (transformers' rope_type "llama3"):
    # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings);
    # None: plain RoPE.
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        _require_positive(self, "decoder", "vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "mlp_dim")
        if self.head_dim is None:
            _require(
                self.width % self.num_heads == 0,
                "decoder.num_heads",
                f"{self.num_heads} heads do not divide width {self.width}",
            )
        else:
            _require_positive(self, "decoder", "head_dim")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "decoder.num_kv_heads",
            f"{self.num_kv_heads} does not divide num_heads {self.num_heads}",
        )
        _require(self.rope_theta > 0, "decoder.rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.rope_llama3_scaling is not None:
            object.__setattr__(self, "rope_llama3_scaling", tuple(self.rope_llama3_scaling))
            factor, low, high, original = self.rope_llama3_scaling if len(self.rope_llama3_scaling) == 4 else (0,) * 4
            _require(
                factor >= 1 and 0 < low < high and original > 0,
                "decoder.rope_llama3_scaling",
                f"expected (factor >= 1, low_freq_factor, high_freq_factor > low_freq_factor > 0, original_max_position_embeddings > 0), got {self.rope_llama3_scaling!r}",
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    layout: LayoutConfig = dataclasses.field(default_factory=LayoutConfig)
    skip: SkipConfig = dataclasses.field(default_factory=SkipConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    fastv: FastVConfig = dataclasses.field(default_factory=FastVConfig)
    dtype: str = "float32"  # compute
    # What the weights are held in. Training keeps float32 master weights
    # (mixed precision: `dtype` bfloat16 computes over them); inference holds a
    # checkpoint in its own dtype (the loaders' default, transformers' "auto").
    param_dtype: str = "float32"
    remat: bool = False
    # What the rematerialized decoder blocks keep for the backward pass: a
    # `jax.checkpoint_policies` name ("nothing_saveable" recomputes the whole
    # block; "dots_with_no_batch_dims_saveable" keeps the weight products).
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False

    def __post_init__(self):
        _require(
            self.remat_policy in REMAT_POLICIES,
            "remat_policy",
            f"unknown {self.remat_policy!r}, expected one of {REMAT_POLICIES}",
        )
        num_visual = self.vision.num_features
        _require(
            self.layout.num_kept <= num_visual,
            "layout.num_kept",
            f"{self.layout.num_kept} kept tokens exceed the {num_visual} visual tokens",
        )
        num_fine = num_visual - self.layout.num_kept
        if self.layout.merge_to is not None:
            _require(
                self.layout.merge_to <= num_fine,
                "layout.merge_to",
                f"{self.layout.merge_to} exceeds the {num_fine} fine tokens",
            )
        _require(
            not (self.layout.summary_tokens and self.num_skipped == 0),
            "layout.summary_tokens",
            "q2 would pool over an empty skipped set; disable summaries or keep fewer tokens",
        )
        _require(
            not (self.layout.summary_tokens and self.layout.num_kept == 0),
            "layout.summary_tokens",
            "q1 would pool over an empty kept set",
        )
        _require(
            self.layout.select == "first"
            or (
                self.vision.select_strategy == "patch" and not self.vision.pooled_grids and self.vision.layers_used > 0
            ),
            "layout.select",
            "cls_attention ranks the patch tokens of one scale inside the feature layer: needs vision.select_strategy"
            " 'patch', no pooled_grids and a feature layer after the embeddings",
        )
        _require(
            self.skip.text_sees_skipped or (self.layout.summary_tokens and self.num_skipped > 0),
            "skip.text_sees_skipped",
            "False needs summary tokens (layout.summary_tokens): nothing would carry the skipped rows to the text",
        )
        _require(self.dtype in FLOAT_DTYPES, "dtype", f"unknown {self.dtype!r}, expected one of {FLOAT_DTYPES}")
        _require(
            self.param_dtype in PARAM_DTYPES,
            "param_dtype",
            f"unknown {self.param_dtype!r}, expected one of {PARAM_DTYPES}",
        )
        n = self.decoder.num_layers
        _require(self.skip.layer_start <= n, "skip.layer_start", f"{self.skip.layer_start} exceeds num_layers {n}")
        _require(
            self.skip.layer_end == -1 or self.skip.layer_start <= self.skip.layer_end <= n,
            "skip.layer_end",
            f"{self.skip.layer_end} is not -1 or in [layer_start, {n}]",
        )
        if self.fastv.enabled:
            _require(
                self.fastv.layer < n, "fastv.layer", f"{self.fastv.layer} leaves no layer to prune for (num_layers {n})"
            )
            _require(
                self.fastv.keep <= self.visual_length,
                "fastv.keep",
                f"{self.fastv.keep} exceeds the {self.visual_length} visual tokens",
            )
            _require(
                not self.skip.enabled, "fastv.layer", "FastV pruning is a baseline for the plain model; disable skip"
            )
            _require(
                not self.scan_layers, "fastv.layer", "FastV pruning needs unrolled layers; set scan_layers to False"
            )

    @property
    def shares_prefixes(self) -> bool:
        """Whether prompts on one image can share their prefix's forward (the
        text before the image, the visual block): not under FastV, whose
        pruning of the visual rows reads the question."""
        return not self.fastv.enabled

    @property
    def visual_length(self) -> int:
        """Rows of the visual block: kept, skipped and the summary tokens."""
        return self.layout.num_kept + self.num_skipped + 2 * int(self.layout.summary_tokens)

    @property
    def num_skipped(self) -> int:
        """Fine visual tokens after merging (or dropping): the skipped segment."""
        if self.layout.drop_fine:
            return 0
        num_fine = self.vision.num_features - self.layout.num_kept
        return num_fine if self.layout.merge_to is None else self.layout.merge_to

    @property
    def skip_layers(self) -> range:
        if not self.skip.enabled:
            return range(0)
        end = self.decoder.num_layers if self.skip.layer_end == -1 else self.skip.layer_end
        return range(self.skip.layer_start, end)


_SECTIONS = {
    "vision": VisionConfig,
    "layout": LayoutConfig,
    "skip": SkipConfig,
    "decoder": DecoderConfig,
    "fastv": FastVConfig,
}


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from nested mappings (e.g. an ml_collections ConfigDict).

    Unknown keys are an error, so a typo in a config file or on the command line
    never silently falls back to a default.
    """
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    _require(not unknown, "model", f"unknown key(s) {unknown}")
    kwargs = {}
    for key, value in values.items():
        section = _SECTIONS.get(key)
        if section is None:
            kwargs[key] = value
            continue
        fields = {f.name for f in dataclasses.fields(section)}
        bad = sorted(set(value) - fields)
        _require(not bad, f"model.{key}", f"unknown key(s) {bad}")
        kwargs[key] = section(**dict(value))
    return ModelConfig(**kwargs)


def _check_numbers(section: Mapping[str, Any], prefix: str, rules: Mapping[str, tuple[Any, str]]) -> None:
    """rules: field -> (predicate on the value, what it must be)."""
    for name, (ok, expected) in rules.items():
        value = section[name]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        _require(is_number and ok(value), f"{prefix}.{name}", f"must be {expected}, got {value!r}")


def validate_experiment(cfg: Mapping[str, Any]) -> None:
    """The data, train and optimizer sections of an experiment config (the
    model section is checked by `model_config_from_dict`): one-line
    `ValueError` naming the first field that cannot be right."""
    positive, non_negative = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
    integer = lambda check, what: (lambda v: float(v).is_integer() and check(v), f"an integer {what}")
    _check_numbers(
        cfg["data"],
        "data",
        {
            "train_size": integer(*positive),
            "val_size": integer(*non_negative),
            "text_len": integer(lambda v: v == 0 or v >= 2, ">= 2 or 0 (from the data)"),
            "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
        },
    )
    _check_numbers(
        cfg["train"],
        "train",
        {
            "steps": integer(*positive),
            "batch_size": integer(*positive),
            "grad_accum": integer(*positive),
            "log_every": integer(*positive),
            "eval_every": integer(*positive),
            "checkpoint_every": integer(*positive),
            "keep_checkpoints": integer(*positive),
            "eval_batches": integer(lambda v: v == -1 or v > 0, "> 0 or -1 (all)"),
        },
    )
    _check_numbers(
        cfg["optimizer"],
        "optimizer",
        {
            "lr": non_negative,  # 0 leaves the weights as they are (e.g. to check an import)
            "warmup_steps": integer(*non_negative),
            "decay_steps": integer(*non_negative),
            "final_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "weight_decay": non_negative,
            "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "clip_norm": positive,
        },
    )
