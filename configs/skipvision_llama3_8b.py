"""The paper's Skip-Vision configuration: CLIP ViT-L/14 at 448 px with the
multi-scale layout (4 x 4 and 16 x 16 pooled grids ahead of the 32 x 32 patch
grid: 16 + 256 + 1024 = 1296 visual tokens, the 272 coarse ones kept, the
1024 fine ones merged to 256 by the official merge, one shared summary pool)
and LLaMA3-8B (4096 wide, 32 layers, 32 heads /
8 KV heads, MLP 14336, vocab 128256, RoPE theta 500000). bf16 compute over
fp32 master weights and optimizer state, scanned layers, remat; stage 2.

    python bench/scale.py --config configs/skipvision_llama3_8b.py --devices 8 --mesh 1,8,1

LLaVA's two stages from LLaMA-3-8B-Instruct and the CLIP tower as they ship:
`configs/skipvision_llama3_8b.py:stage1` and `:stage2`, as in configs/llava15_7b.py,
in the official code's templates: `llama3_plain` for stage 1 (its
`--version llama3-plain`), `llama3` otherwise (`--version llama3`).
"""

from ml_collections import ConfigDict

from configs import llava15_7b


def get_config(stage: str = "") -> ConfigDict:
    cfg = llava15_7b.get_config(stage)
    cfg.model.vision.update({"image_size": 448, "pooled_grids": (4, 16)})
    # The coarse tokens are kept by position (the CLS ranking is the 576-token setting's).
    cfg.model.layout.update({"num_kept": 272, "select": "first", "merge_to": 256, "summary_tokens": True})
    cfg.model.decoder.update(
        {
            "vocab_size": 128256,
            "width": 4096,
            "num_layers": 32,
            "num_heads": 32,
            "num_kv_heads": 8,
            "mlp_dim": 14336,
            "rope_theta": 500000.0,
        }
    )
    cfg.data.template = "llama3_plain" if stage == "stage1" else "llama3"
    return cfg
