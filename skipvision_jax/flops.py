"""Analytic FLOP counts of the model, to check compiled counts and to report
the ideal saving of a configuration.

Only matrix products are counted (2 FLOPs per multiply-add); norms, softmax
and element-wise work are a few percent at realistic widths.
"""

from __future__ import annotations

from skipvision_jax.config import ModelConfig, VisionConfig
from skipvision_jax.nn.token_merge import merge_schedule
from skipvision_jax.partition import SequenceLayout


def forward_flops(cfg: ModelConfig, num_text: int, batch: int, vision_width: int | None = None) -> dict[str, float]:
    """Forward FLOPs by part, from precomputed vision features of `vision_width`."""
    d = cfg.decoder
    layout = SequenceLayout.from_config(cfg, num_text)
    length, dh = layout.length, d.resolved_head_dim
    num_visual = cfg.vision.num_features
    vision_width = vision_width or cfg.vision.width
    projector = 2 * num_visual * (vision_width * d.width + d.width * d.width)
    merge = 0.0
    tokens = num_visual - cfg.layout.num_kept
    if cfg.layout.merge_to is not None and cfg.layout.merge_method == "official":
        # all-pairs similarity, then the r removed tokens against the rest
        removed = tokens - cfg.layout.merge_to
        if removed:  # nothing removed: the tokens pass as they are
            merge = 2 * tokens * tokens * d.width + 2 * removed * cfg.layout.merge_to * d.width
    elif cfg.layout.merge_to is not None:
        for removed in merge_schedule(tokens, cfg.layout.merge_to):
            merge += 2 * ((tokens + 1) // 2) * (tokens // 2) * d.width
            tokens -= removed
    attention = 0.0
    ffn = 0.0
    for layer in range(d.num_layers):
        attention += 2 * length * d.width * dh * (2 * d.num_heads + 2 * d.num_kv_heads)  # q, o, k, v projections
        attention += 2 * 2 * length * length * d.num_heads * dh  # scores and weighted values
        rows = layout.num_retained if layer in cfg.skip_layers else length
        ffn += 2 * 3 * rows * d.width * d.mlp_dim
    lm_head = 2 * num_text * d.width * d.vocab_size
    parts = {"projector": projector, "merge": merge, "attention": attention, "ffn": ffn, "lm_head": lm_head}
    return {k: batch * v for k, v in parts.items()}


def train_step_flops(cfg: ModelConfig, num_text: int, batch: int, vision_width: int | None = None) -> float:
    """Forward + backward: each product costs 3x its forward (one product for the
    output, two for the gradients), except the first projector layer, whose
    input (fixed features) needs no gradient, and the merge similarities, which
    only choose partners (argmax) and carry no gradient."""
    parts = forward_flops(cfg, num_text, batch, vision_width)
    first_projector = batch * 2 * cfg.vision.num_features * (vision_width or cfg.vision.width) * cfg.decoder.width
    return 3 * sum(parts.values()) - first_projector - 2 * parts["merge"]


def vision_forward_flops(vision: VisionConfig) -> float:
    """Forward FLOPs of the tower for one image: patch embedding and the
    encoder layers it runs (the class token included)."""
    tokens = vision.num_patches + 1
    patch_embed = 2 * vision.num_patches * vision.patch_size**2 * vision.num_channels * vision.width
    per_layer = (
        2 * tokens * 4 * vision.width**2
        + 2 * 2 * tokens**2 * vision.width
        + 2 * 2 * tokens * vision.width * vision.mlp_dim
    )
    return patch_embed + vision.layers_used * per_layer
