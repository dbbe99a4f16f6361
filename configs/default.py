"""Default experiment: Skip-Vision on the embedded synthetic VQA task.

    python train.py --workdir runs/default
    python train.py --workdir runs/noskip --config.model.skip.enabled=False

Layout: 32 x 32 images, 4-pixel patches (8 x 8 = 64 fine tokens) plus a
4 x 4 average-pooled grid (16 coarse tokens) first, as the paper's multi-scale
layout; the 16 coarse tokens are kept, the 64 fine ones are merged to 16 and
skip the FFN in every decoder layer.
"""

from ml_collections import ConfigDict

from skipvision_jax.data.synthetic import IMAGE_SIZE, SyntheticVQA


def get_config() -> ConfigDict:
    cfg = ConfigDict()
    cfg.model = ConfigDict(
        {
            "vision": {"image_size": IMAGE_SIZE, "patch_size": 4, "width": 96, "depth": 2, "num_heads": 4, "mlp_dim": 192, "select_layer": -1, "pooled_grids": (4,)},
            "layout": {"image_offset": SyntheticVQA.image_offset, "num_kept": 16, "merge_to": 16, "summary_tokens": True},
            "skip": {"enabled": True, "partition": "positional", "layer_start": 0, "layer_end": -1},
            "decoder": {"vocab_size": len(SyntheticVQA.tokenizer), "width": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 384},
            "dtype": "float32",
            "remat": False,
            "scan_layers": False,
        }
    )
    cfg.data = ConfigDict(
        {
            "kind": "synthetic",  # or "llava"
            "seed": 0,
            "train_size": 200_000,
            "val_size": 1000,
            "text_len": 16,
            # LLaVA-format data (kind = "llava"):
            "json_path": "",
            "val_json_path": "",
            "image_dir": "",
            "tokenizer": "",  # a Hugging Face tokenizer.json
            "on_bad_record": "skip",  # or "raise"
        }
    )
    cfg.train = ConfigDict(
        {
            "steps": 1500,
            "seed": 0,
            "batch_size": 64,
            "grad_accum": 1,
            "log_every": 25,
            "eval_every": 250,
            "eval_batches": -1,  # -1: the whole validation set
            "checkpoint_every": 500,
            "keep_checkpoints": 3,
        }
    )
    cfg.optimizer = ConfigDict(
        {
            "lr": 1e-3,
            "warmup_steps": 100,
            "final_lr_fraction": 0.05,
            "weight_decay": 0.01,
            "b1": 0.9,
            "b2": 0.98,
            "clip_norm": 1.0,
            "trainable": "all",  # "projector" (LLaVA stage 1), "projector+decoder" (stage 2), "all"
        }
    )
    return cfg
