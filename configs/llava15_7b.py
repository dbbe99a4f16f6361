"""LLaVA-1.5-7B geometry with Skip-Vision: CLIP ViT-L/14-336 (select layer
-2), a 2-layer MLP projector to 4096, Vicuna-7B (4096 wide, 32 layers, 32
heads, MLP 11008, vocab 32000); 576 visual tokens, the paper's 100 kept (by
the CLS token's attention, as the official code's use_zip) and 476 merged to
156 by the official merge, one summary pool shared by q1 and q2 (the
official model's `ada`). bf16 compute over fp32 master weights and optimizer
state, scanned decoder layers, remat; LLaVA stage 2 (the tower frozen).

Sized without weights by `python bench/scale.py --config configs/llava15_7b.py`;
training it needs LLaVA data (`--config.data.kind=llava ...`) and, for the
real weights, `--config.init_from_hf=llava-1.5-7b-hf` with scan_layers=False.

LLaVA's two stages from the parts as they ship (the paper's recipe;
skipvision_jax/interop/parts.py), as `configs/llava15_7b.py:stage1` and `:stage2`:

    python train.py --workdir runs/pt --config configs/llava15_7b.py:stage1 \
        --config.init.language_model=vicuna-7b-v1.5 --config.init.vision_tower=clip-vit-large-patch14-336 \
        --config.data.json_path=blip_laion_cc_sbu_558k.json --config.data.image_dir=... --config.data.tokenizer=...
    python train.py --workdir runs/sft --config configs/llava15_7b.py:stage2 --config.init.checkpoint=runs/pt \
        --config.data.json_path=llava_v1_5_mix665k.json ...

stage1 trains the projector and the summary pool (`optimizer.trainable=
"projector"`) at lr 1e-3, batch 256, one epoch of LLaVA-Pretrain's 558k; the
official code trains only `mm_projector` there and leaves `ada` at its
initialization until stage 2 (`llava/train/train.py` lines 1130-1137: every
other parameter frozen), here the fresh pool learns with the projector.
stage2 trains projector + language model from stage 1's params at lr 2e-5,
batch 128, one epoch of the 665k mix; both warm up over 3% of the steps, no
weight decay (LLaVA's scripts/v1_5/pretrain.sh and finetune.sh; the official
pretrain_mlp_llama3-8b.sh and sft_cos_clipvit-*.sh set the same rates). The
stages run unrolled layers (the parts load into them). The chat template is
Vicuna-v1 (data/llava.py); LLaMA-3's template is not built.
"""

from ml_collections import ConfigDict

from configs import default
from skipvision_jax.config import OFFICIAL_LLAVA_LAYOUT

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


# stage -> (what trains, peak lr, global batch, steps: one epoch of LLaVA's data, template)
STAGES = {
    "stage1": ("projector", 1e-3, 256, 558_128 // 256, "plain"),
    "stage2": ("projector+decoder", 2e-5, 128, 665_298 // 128, "vicuna_v1"),
}


def with_stage(cfg: ConfigDict, stage: str) -> ConfigDict:
    """`cfg` as LLaVA's stage 1 or 2 (the module docstring); "" leaves it as it is."""
    if not stage:
        return cfg
    if stage not in STAGES:
        raise ValueError(f"config stage: unknown {stage!r}, expected one of {tuple(STAGES)} (configs/x.py:stage1)")
    trainable, lr, batch, steps, template = STAGES[stage]
    cfg.model.scan_layers = False
    cfg.data.template = template
    cfg.optimizer.update({"trainable": trainable, "lr": lr, "warmup_steps": int(0.03 * steps), "weight_decay": 0.0})
    cfg.train.update({"batch_size": batch, "steps": steps})
    return cfg


def get_config(stage: str = "") -> ConfigDict:
    cfg = default.get_config()
    cfg.model.vision.update(CLIP_VIT_L_336)
    # The official LLaVA setting: the 100 kept tokens by CLS attention (clip_encoder.py's use_zip),
    # the rest merged by RandomBipartiteSoftMatching (llava_arch_index_q_tome.py:535), one `ada` pool.
    cfg.model.layout.update(OFFICIAL_LLAVA_LAYOUT)
    cfg.model.decoder.update(
        {"vocab_size": 32000, "width": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32, "mlp_dim": 11008}
    )
    cfg.model.update({"dtype": "bfloat16", "remat": True, "remat_policy": "nothing_saveable", "scan_layers": True})
    cfg.data.update({"kind": "llava", "text_len": 128, "train_kind_weights": ()})
    cfg.train.update({"batch_size": 128, "steps": 5000})
    cfg.optimizer.update(
        {"lr": 2e-5, "warmup_steps": 150, "weight_decay": 0.0, "b2": 0.999, "trainable": "projector+decoder"}
    )
    cfg.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    return with_stage(cfg, stage)
