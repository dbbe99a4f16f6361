"""The pictures of what the model keeps in the docs (docs/images/):

    python bench/token_maps.py --embedded runs/default --easy-vqa runs/easy_vqa [--detail runs/detail]

- token_map_embedded.png: the embedded task's model (4 coarse tokens kept,
  16 patches merged to 8), SnapKV at half the cache;
- token_map_easy_vqa.png: easy-VQA's (16 of 64 patches kept by the class
  token's attention, 48 merged to 12), SnapKV at half the cache;
- token_map_detail.png: the detail task's layout (9 coarse kept, 36 fine
  merged to 12), the trained run of `--detail` or else random weights;
- token_map_llava.png: LLaVA-1.5's geometry with random weights (CLIP
  ViT-L/14-336's 576 patches, 100 kept by the class token's attention, 476
  merged to 156), a reduced decoder.

Each from an image of its own task (the validation or test split).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from skipvision_jax.config import OFFICIAL_LLAVA_LAYOUT, LayoutConfig, ModelConfig, SkipConfig  # noqa: E402
from skipvision_jax.data.images import preprocess  # noqa: E402
from skipvision_jax.data.synthetic import SyntheticVQA  # noqa: E402
from skipvision_jax.inference import LoadedModel, load_trained  # noqa: E402
from skipvision_jax.kvcache import KVPolicy  # noqa: E402
from skipvision_jax.visualize import draw, token_map  # noqa: E402

OUT = os.path.join(REPO, "docs", "images")
SNAPKV_HALF = KVPolicy.of("snapkv", None, 0.5)


def generated_image(task) -> Image.Image:
    """Validation example 3 of a generated task, as the PNG its export writes."""
    scene, _, _, _, rng = task("val", 8).sample(3)
    return Image.fromarray(np.round(scene.render(rng) * 255).astype(np.uint8))


def random_model(cfg: ModelConfig, image_offset: int) -> LoadedModel:
    """A model of `cfg` with random weights, prompting with random ids (the text does not change the layout)."""
    import flax.linen as nn
    import jax

    from skipvision_jax import sharding
    from skipvision_jax.nn.shapes import init_params

    cfg = dataclasses.replace(cfg, layout=dataclasses.replace(cfg.layout, image_offset=image_offset))
    params = nn.unbox(jax.jit(lambda: init_params(cfg, 0))())
    text = np.arange(3, 3 + image_offset + 8, dtype=np.int32)

    def encode(image, turns):
        pixels = preprocess(image, cfg.vision.image_size)
        return {"input_ids": text[None], "text_mask": np.ones((1, len(text)), bool), "pixels": pixels[None]}, cfg

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    return LoadedModel(cfg, params, mesh, sharding.DEFAULT_RULES, (), 0, str, encode, len(text))


def llava_geometry() -> LoadedModel:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import DECODER, VISION_576

    layout = LayoutConfig(**OFFICIAL_LLAVA_LAYOUT)
    return random_model(ModelConfig(VISION_576, layout, SkipConfig(), DECODER), image_offset=35)


def detail_model(run: str | None) -> LoadedModel:
    from configs import detail
    from skipvision_jax.experiment import sizing_model_config

    if run:
        return load_trained(run)
    return random_model(sizing_model_config(detail.get_config()), image_offset=1)


def save(loaded: LoadedModel, image: Image.Image, prompt: str, policy, name: str, title: str) -> dict:
    token = token_map(loaded, image, prompt, policy)
    path = os.path.join(OUT, name)
    draw(token, title).savefig(path, dpi=100)
    return {"picture": path, "kept": int(token.kept.sum()), "skipped": int((token.group >= 0).sum())}


def main() -> None:
    from skipvision_jax.data.detail import DetailVQA

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedded", required=True, help="a trained run of configs/default.py")
    parser.add_argument("--easy-vqa", required=True, help="a trained run of configs/easy_vqa.py")
    parser.add_argument("--easy-vqa-data", default=os.path.join(REPO, "data", "easy_vqa"))
    parser.add_argument("--detail", default=None, help="a trained run of configs/detail.py (default: random weights)")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    easy_image = Image.open(os.path.join(args.easy_vqa_data, "images", "test", "0.png"))
    done = [
        save(
            load_trained(args.embedded),
            generated_image(SyntheticVQA),
            "What color is the ring?",
            SNAPKV_HALF,
            "token_map_embedded.png",
            "embedded task: 4 coarse kept, 16 patches merged to 8; SnapKV at 0.5",
        ),
        save(
            load_trained(args.easy_vqa),
            easy_image,
            "What shape is in the image?",
            SNAPKV_HALF,
            "token_map_easy_vqa.png",
            "easy-VQA: 16 of 64 patches kept by the class token's attention, 48 merged to 12; SnapKV at 0.5",
        ),
        save(
            detail_model(args.detail),
            generated_image(DetailVQA),
            "what digits are in row 3 ?",
            None,
            "token_map_detail.png",
            "detail task: 9 coarse kept, 36 fine merged to 12" + ("" if args.detail else " (random weights)"),
        ),
        save(
            llava_geometry(),
            easy_image.resize((336, 336)),
            "What is shown?",
            None,
            "token_map_llava.png",
            "LLaVA-1.5 geometry, random weights: 100 of 576 kept by the class token's attention, 476 merged to 156",
        ),
    ]
    print(json.dumps(done))


if __name__ == "__main__":
    main()
