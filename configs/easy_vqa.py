"""easy-VQA (skipvision_jax/data/easy_vqa.py) through LLaVA's path: its
training JSON, a BPE tokenizer, LLaVA-1.5's vicuna_v1 template.

    pip install easy-vqa
    python -m skipvision_jax.data.easy_vqa --export data/easy_vqa
    python train.py --workdir runs/easy_vqa --config configs/easy_vqa.py:data/easy_vqa

After the colon: the export's directory (default data/easy_vqa); the training
and validation JSON, the images and the tokenizer are read from it. The image
offset, the vocabulary and the text length follow from the tokenizer, the
template and the data.

Layout: the paper's LLaVA setting in small. 64 x 64 images, 8-pixel patches
(8 x 8 = 64 tokens); the 16 the class token attends most in the tower's last
layer are kept (the official code's `use_zip`), the other 48 are merged to 12
by the official merge and skip the FFN in every decoder layer; one summary
pool shared by q1 and q2. The run exports to LLaVA's own layout.
"""

import os

from ml_collections import ConfigDict

from configs import default


def get_config(directory: str = "data/easy_vqa") -> ConfigDict:
    cfg = default.get_config()
    cfg.model.vision.update(
        {
            "image_size": 64,
            "patch_size": 8,
            "width": 96,
            "depth": 2,
            "num_heads": 4,
            "mlp_dim": 192,
            "select_layer": -1,
            "pooled_grids": (),
        }
    )
    cfg.model.layout.update(
        {
            "num_kept": 16,
            "select": "cls_attention",
            "merge_to": 12,
            "merge_method": "official",
            "summary_pool": "shared",
        }
    )
    cfg.data.update(
        {
            "kind": "llava",
            **data_paths(directory),
            "template": "vicuna_v1",
            "train_kind_weights": (),
        }
    )
    cfg.train.update({"steps": 1500, "batch_size": 32, "eval_every": 500, "eval_batches": 20, "checkpoint_every": 500})
    cfg.optimizer.update({"lr": 1e-3, "warmup_steps": 200})
    return cfg


def data_paths(directory: str) -> dict[str, str]:
    """The export's files (data/easy_vqa.py) under `directory`."""
    return {
        "json_path": os.path.join(directory, "train.json"),
        "val_json_path": os.path.join(directory, "val.json"),
        "image_dir": os.path.join(directory, "images"),
        "tokenizer": os.path.join(directory, "tokenizer.json"),
    }
