"""layout.select="cls_attention" (the official LLaVA setting's VisionZip-style
kept tokens) against transformers' CLIP: the kept tokens are those whose
CLS attention, read off transformers' attention weights of the feature layer
and ranked in NumPy, is highest, for an HF-imported tower and for ours."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from skipvision_jax.config import LayoutConfig, SkipConfig
from skipvision_jax.interop import hf_llava, hf_model
from skipvision_jax.nn import SkipVisionVLM
from tests.conftest import TINY_VISION, init_params, tiny_config
from tests.hf_tiny import make_hf_llava, write_image

KEPT = 5


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("gqa"))
    make_hf_llava(directory, "gqa")
    return directory


def reference_order(directory: str, pixels_nhwc: np.ndarray, layers_used: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' CLIP (eager attention) on the same pixels: the feature
    layer's CLS attention to the patches, mean over heads, its top KEPT in
    image order (NumPy), and the feature layer's patch states."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.model.vision_tower(
            torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2).copy()),
            output_attentions=True,
            output_hidden_states=True,
        )
    received = out.attentions[layers_used - 1][0, :, 0, 1:].numpy().mean(axis=0)  # [patches]
    kept = np.sort(np.argsort(-received, kind="stable")[:KEPT])
    return kept, out.hidden_states[layers_used][0, 1:].numpy()


def our_features(params, cfg, pixels) -> np.ndarray:
    return np.asarray(SkipVisionVLM(cfg).apply({"params": params}, pixels, method=SkipVisionVLM.encode_images))[0]


def check_kept_tokens(directory, params, cfg, pixels):
    kept, patches = reference_order(directory, np.asarray(pixels), cfg.vision.layers_used)
    features = our_features(params, cfg, pixels)
    fine = np.setdiff1d(np.arange(cfg.vision.num_patches), kept)
    # The kept tokens first, in image order, then the fine ones in image order.
    np.testing.assert_allclose(features, patches[np.concatenate([kept, fine])], atol=2e-4, rtol=1e-4)
    first = our_features(
        params, dataclasses.replace(cfg, layout=dataclasses.replace(cfg.layout, select="first")), pixels
    )
    np.testing.assert_allclose(first, patches, atol=2e-4, rtol=1e-4)  # select="first": image order, as before
    assert not np.array_equal(kept, np.arange(KEPT))  # the ranking chose something else than the first tokens


def test_an_imported_clip_keeps_the_tokens_its_cls_attends_most(gqa_dir, tmp_path):
    # Summary tokens would be fresh weights the import cannot fill; the tower's part is what is checked.
    layout = LayoutConfig(num_kept=KEPT, merge_to=None, summary_tokens=False, select="cls_attention")
    hf = hf_model.load(gqa_dir, layout=layout, skip=SkipConfig(enabled=False))
    batch, cfg = hf_model.encode(hf, Image.open(write_image(str(tmp_path / "i.png"))), "what is in the picture ?")
    check_kept_tokens(gqa_dir, hf.params, cfg, batch["pixels"])


def test_our_tower_keeps_the_tokens_its_cls_attends_most(gqa_dir, tmp_path):
    """Our own random tower, exported to transformers for the reference."""
    # transformers holds the plain layout only: export a plain model; the tower is the same in both.
    plain = tiny_config(
        layout=LayoutConfig.plain(TINY_VISION.num_features, image_offset=2), skip=SkipConfig(enabled=False)
    )
    _, params = init_params(plain, seed=0)  # a draw whose class token does not rank the first patches top
    shutil.copytree(gqa_dir, str(tmp_path / "hf"), dirs_exist_ok=True)  # tokenizer and processor files
    hf_llava.save(str(tmp_path / "hf"), params, plain, image_token_id=4)
    cfg = tiny_config(layout=LayoutConfig(image_offset=2, num_kept=KEPT, merge_to=5, select="cls_attention"))
    pixels = np.random.default_rng(0).normal(size=(1, TINY_VISION.image_size, TINY_VISION.image_size, 3))
    check_kept_tokens(str(tmp_path / "hf"), params, cfg, pixels.astype(np.float32))


@pytest.mark.parametrize(
    "select, strategy, message",
    [
        ("topk", "patch", "layout.select: unknown 'topk'"),
        ("cls_attention", "full", "layout.select: cls_attention ranks the patch tokens of one scale"),
    ],
)
def test_bad_selections_are_clear_errors(select, strategy, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(
            layout=LayoutConfig(image_offset=2, num_kept=6, merge_to=5, select=select),
            vision=dataclasses.replace(TINY_VISION, select_strategy=strategy),
        )
