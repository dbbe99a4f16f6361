"""Loading checkpoints as they come: in their own dtype (a bfloat16 LLaVA
holds bfloat16 weights at half the float32 bytes, as transformers'
dtype="auto"), sharded, and in the key layouts today's transformers writes
(files written in transformers 5.2's layout, then renamed key by key to the
later ones)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from skipvision_jax.interop import hf_llava, hf_model
from skipvision_jax.interop.parts import load_parts
from skipvision_jax.nn.shapes import abstract_params
from tests.hf_tiny import make_hf_llava, make_parts


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    """The same random LLaVA saved by transformers in float32 and in bfloat16."""
    import torch

    root = tmp_path_factory.mktemp("llava")
    model = make_hf_llava(str(root / "fp32"), "gqa")
    model.to(torch.bfloat16).save_pretrained(str(root / "bf16"))
    return str(root / "fp32"), str(root / "bf16")


def flat(params) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")


def test_a_bf16_checkpoint_is_held_in_bf16_at_half_the_bytes(llava_dirs):
    fp32_dir, bf16_dir = llava_dirs
    fp32, bf16 = hf_model.load(fp32_dir), hf_model.load(bf16_dir)
    assert (fp32.model_cfg.param_dtype, fp32.model_cfg.dtype) == ("float32", "float32")
    assert (bf16.model_cfg.param_dtype, bf16.model_cfg.dtype) == ("bfloat16", "bfloat16")
    held = {str(x.dtype) for x in jax.tree.leaves(bf16.params)}
    assert held == {"bfloat16"}
    nbytes = lambda hf: sum(x.nbytes for x in jax.tree.leaves(hf.params))
    assert nbytes(bf16) * 2 == nbytes(fp32)
    # the weights are the checkpoint's own: float32's rounded to bfloat16, exactly
    for path, value in flat(bf16.params).items():
        np.testing.assert_array_equal(value, flat(fp32.params)[path].astype(value.dtype), err_msg=path)


def test_dtype_overrides_what_the_weights_are_held_and_computed_in(llava_dirs):
    _, bf16_dir = llava_dirs
    hf = hf_model.load(bf16_dir, dtype="float32")
    assert (hf.model_cfg.param_dtype, hf.model_cfg.dtype) == ("float32", "float32")
    assert {str(x.dtype) for x in jax.tree.leaves(hf.params)} == {"float32"}


def test_sharded_exports_read_back_shard_by_shard(llava_dirs, tmp_path):
    fp32_dir, _ = llava_dirs
    hf = hf_model.load(fp32_dir)
    out = str(tmp_path / "sharded")
    os.makedirs(out)
    tensors = list(hf_llava.export_tensors(hf.params, hf.unused))
    hf_llava.write_safetensors(out, iter(tensors), shard_bytes=sum(v.nbytes for _, v in tensors) // 3)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) >= 3 and set(index["weight_map"]) == {n for n, _ in tensors}
    with open(os.path.join(fp32_dir, "config.json")) as f:
        open(os.path.join(out, "config.json"), "w").write(f.read())
    reread = hf_model.load(out)
    for path, value in flat(hf.params).items():
        np.testing.assert_array_equal(flat(reread.params)[path], value, err_msg=path)


# transformers' later LLaVA layout: the language model and tower under `model.`, with or without `vision_model.`
LATER_LLAVA = {
    "with the tower's vision_model.": {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "vision_tower.vision_model.": "model.vision_tower.vision_model.",
    },
    "bare tower": {
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "vision_tower.vision_model.": "model.vision_tower.",
    },
}


def renamed(source: str, target: str, renames: dict[str, str]) -> str:
    """A copy of a checkpoint (model.safetensors + config.json) with its keys' prefixes renamed."""
    os.makedirs(target, exist_ok=True)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    out = {}
    for name, value in tensors.items():
        prefix = next((p for p in renames if name.startswith(p)), None)
        out[renames[prefix] + name[len(prefix) :] if prefix else name] = value
    assert out.keys() != tensors.keys()
    save_file(out, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(source, "config.json")) as f:
        open(os.path.join(target, "config.json"), "w").write(f.read())
    return target


@pytest.mark.parametrize("layout", list(LATER_LLAVA))
def test_later_llava_layouts_read_the_same_weights(llava_dirs, tmp_path, layout):
    fp32_dir, _ = llava_dirs
    later = renamed(fp32_dir, str(tmp_path / "later"), LATER_LLAVA[layout])
    expected, got = flat(hf_model.load(fp32_dir).params), flat(hf_model.load(later).params)
    assert expected.keys() == got.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)


def test_a_clip_tower_saved_without_vision_model_reads_the_same_weights(tmp_path):
    """A CLIPVisionModel as transformers after 5.x saves it: keys without `vision_model.`."""
    from skipvision_jax.interop.parts import model_config_from_parts
    from tests.conftest import tiny_config

    parts = make_parts(str(tmp_path / "parts"), ["what", "is"])
    bare = renamed(parts["vision_tower"], str(tmp_path / "bare"), {"vision_model.": ""})
    cfg = model_config_from_parts(tiny_config(), {"vision_tower": parts["vision_tower"]})
    abstract = abstract_params(cfg, None)
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    expected = flat(load_parts({"vision_tower": parts["vision_tower"]}, fresh, abstract)["vision"])
    got = flat(load_parts({"vision_tower": bare}, fresh, abstract)["vision"])
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
