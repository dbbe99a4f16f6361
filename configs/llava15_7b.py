"""LLaVA-1.5-7B geometry with Skip-Vision: CLIP ViT-L/14-336 (select layer
-2), a 2-layer MLP projector to 4096, Vicuna-7B (4096 wide, 32 layers, 32
heads, MLP 11008, vocab 32000); 576 visual tokens, the paper's 100 kept (by
the CLS token's attention, as the official code's use_zip) and 476 merged to 156. bf16 compute over fp32 master weights and optimizer
state, scanned decoder layers, remat; LLaVA stage 2 (the tower frozen).

Sized without weights by `python bench/scale.py --config configs/llava15_7b.py`;
training it needs LLaVA data (`--config.data.kind=llava ...`) and, for the
real weights, `--config.init_from_hf=llava-1.5-7b-hf` with scan_layers=False.
"""

from ml_collections import ConfigDict

from configs import default

CLIP_VIT_L_336 = {
    "image_size": 336,
    "patch_size": 14,
    "width": 1024,
    "depth": 24,
    "num_heads": 16,
    "mlp_dim": 4096,
    "select_layer": -2,
    "pooled_grids": (),
    "pos_embed_init": "normal",
}


def get_config() -> ConfigDict:
    cfg = default.get_config()
    cfg.model.vision.update(CLIP_VIT_L_336)
    # The official LLaVA setting: the 100 kept tokens by CLS attention (clip_encoder.py's use_zip).
    cfg.model.layout.update(
        {"image_offset": 35, "num_kept": 100, "select": "cls_attention", "merge_to": 156, "summary_tokens": True}
    )
    cfg.model.decoder.update(
        {"vocab_size": 32000, "width": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32, "mlp_dim": 11008}
    )
    cfg.model.update({"dtype": "bfloat16", "remat": True, "remat_policy": "nothing_saveable", "scan_layers": True})
    cfg.data.update({"kind": "llava", "text_len": 128})
    cfg.train.update({"batch_size": 128, "steps": 5000})
    cfg.optimizer.update(
        {"lr": 2e-5, "warmup_steps": 150, "weight_decay": 0.0, "b2": 0.999, "trainable": "projector+decoder"}
    )
    cfg.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    return cfg
