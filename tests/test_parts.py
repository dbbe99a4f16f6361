"""Training from the parts as they ship (LLaVA's recipe): a transformers
LlamaForCausalLM, a CLIP tower and a pretrain-stage mm_projector.bin, through
LLaVA's two stages on the embedded task exported in LLaVA's training format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from skipvision_jax.data.llava import LlavaTransform
from skipvision_jax.data.synthetic import WORDS
from skipvision_jax.data.tasks import export_llava_train
from skipvision_jax.interop.hf_llava import HFCheckpointError
from skipvision_jax.train.loop import train_and_evaluate
from tests.helpers import restore_params, tiny_train_config
from tests.hf_tiny import make_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    paths = make_parts(str(root), words=WORDS + ["which?", "ring?", "square?", "dot?", "cross?", "object?", "there?"])
    data = export_llava_train(str(root / "data"), "train", 8)
    return {**paths, **data}


def stage_config(parts, trainable: str, lr: float, **init):
    tokenizer = f"{parts['language_model']}/tokenizer.json"
    offset = LlavaTransform(Tokenizer.from_file(tokenizer), parts["images"], 16, 64).image_offset
    return tiny_train_config(
        **{
            **{f"init.{name}": path for name, path in init.items()},
            "data.kind": "llava",
            "data.json_path": parts["json"],
            "data.val_json_path": parts["json"],
            "data.image_dir": parts["images"],
            "data.tokenizer": tokenizer,
            "data.text_len": 64,
            "model.vision.select_layer": -2,  # the tower's second-to-last layer, as LLaVA
            "model.vision.pooled_grids": (),
            "model.layout.image_offset": offset,
            "model.layout.num_kept": 4,
            "model.layout.merge_to": 6,
            "model.layout.merge_method": "official",
            "model.layout.summary_pool": "shared",
            "optimizer.trainable": trainable,
            "optimizer.lr": lr,
            "optimizer.warmup_steps": 0,
            "train.steps": 2,
            "train.batch_size": 2,
            "train.eval_every": 2,
            "train.checkpoint_every": 2,
        }
    )


def source_tensors(path: str) -> dict[str, np.ndarray]:
    return load_file(f"{path}/model.safetensors")


def assert_tower_and_decoder_equal_the_sources(params, parts):
    """Each of our weights against its source tensor, the layout change
    restated here (torch Linear [out, in] -> our [in, out...], conv
    [out, in, kh, kw] -> [kh, kw, in, out])."""
    lm, tower = source_tensors(parts["language_model"]), source_tensors(parts["vision_tower"])
    eq = np.testing.assert_array_equal
    eq(params["embed"]["embedding"], lm["model.embed_tokens.weight"])
    eq(params["final_norm"]["scale"], lm["model.norm.weight"])
    eq(params["lm_head"]["kernel"], lm["lm_head.weight"].T)
    for i in range(3):
        layer = params["decoder"][f"layer_{i}"]
        eq(layer["attn_norm"]["scale"], lm[f"model.layers.{i}.input_layernorm.weight"])
        eq(layer["mlp"]["down"]["kernel"], lm[f"model.layers.{i}.mlp.down_proj.weight"].T)
        q = layer["attn"]["q_proj"]["kernel"]
        eq(q.reshape(q.shape[0], -1), lm[f"model.layers.{i}.self_attn.q_proj.weight"].T)
    eq(params["vision"]["pos_embed"], tower["vision_model.embeddings.position_embedding.weight"])
    eq(params["vision"]["class_embed"], tower["vision_model.embeddings.class_embedding"])
    eq(
        params["vision"]["patch_embed"]["kernel"],
        tower["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
    )
    eq(params["vision"]["pre_norm"]["norm"]["scale"], tower["vision_model.pre_layrnorm.weight"])
    for i in range(2):  # select_layer -2 of 3: the last layer is not built
        eq(params["vision"][f"layer_{i}"]["fc1"]["kernel"], tower[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"].T)
    assert "layer_2" not in params["vision"]


def test_two_stages_from_the_parts(parts, tmp_path):
    stage1 = str(tmp_path / "stage1")
    cfg1 = stage_config(
        parts, "projector", 1e-3, **{k: parts[k] for k in ("language_model", "vision_tower", "projector")}
    )
    train_and_evaluate(cfg1, stage1)
    state1, _ = restore_params(stage1, cfg1)
    # Stage 1 trains the projector and the summary pool only.
    assert_tower_and_decoder_equal_the_sources(state1.params, parts)
    projector = torch.load(parts["projector"], weights_only=True)
    trained = state1.params["visual_tokens"]["projector"]["linear_1"]["kernel"]
    source = projector["model.mm_projector.0.weight"].numpy().T
    assert not np.array_equal(trained, source)  # it trained ...
    np.testing.assert_allclose(trained, source, atol=1e-2)  # ... from the file's weights (2 steps at 1e-3)
    assert "summary" in state1.params["visual_tokens"]

    # Stage 2 starts from stage 1's params (a fresh optimizer) and trains the decoder too.
    stage2 = str(tmp_path / "stage2")
    cfg2 = stage_config(parts, "projector+decoder", 1e-3, checkpoint=stage1)
    train_and_evaluate(cfg2, stage2)
    state2, _ = restore_params(stage2, cfg2)
    np.testing.assert_array_equal(state2.params["vision"]["pos_embed"], state1.params["vision"]["pos_embed"])
    before = state1.params["decoder"]["layer_0"]["mlp"]["down"]["kernel"]
    after = state2.params["decoder"]["layer_0"]["mlp"]["down"]["kernel"]
    assert not np.array_equal(before, after)
    np.testing.assert_allclose(after, before, atol=1e-2)


def test_a_clip_model_directory_gives_its_vision_half(tmp_path):
    paths = make_parts(str(tmp_path), words=WORDS, clip_model=True)
    data = export_llava_train(str(tmp_path / "data"), "train", 4)
    parts = {**paths, **data}
    cfg = stage_config(
        parts, "projector", 0.0, language_model=parts["language_model"], vision_tower=parts["vision_tower"]
    )
    workdir = str(tmp_path / "run")
    train_and_evaluate(cfg, workdir)
    assert_tower_and_decoder_equal_the_sources(restore_params(workdir, cfg)[0].params, parts)


def test_a_part_that_does_not_fit_is_a_one_line_error(parts, tmp_path):
    # A projector for another width: named with its tensor and file, before any step.
    bad = str(tmp_path / "mm_projector.bin")
    torch.save(
        {
            f"model.mm_projector.{i}.{w}": torch.zeros(3, 3) if w == "weight" else torch.zeros(3)
            for i in (0, 2)
            for w in ("weight", "bias")
        },
        bad,
    )
    cfg = stage_config(
        parts,
        "projector",
        1e-3,
        language_model=parts["language_model"],
        vision_tower=parts["vision_tower"],
        projector=bad,
    )
    with pytest.raises(
        HFCheckpointError, match=r"mm_projector\.bin: tensor model\.mm_projector\.0\.weight of shape \[3, 3\]"
    ):
        train_and_evaluate(cfg, str(tmp_path / "run"))
    # A language model directory whose layers are missing.
    partial = tmp_path / "partial_lm"
    partial.mkdir()
    (partial / "config.json").write_text(open(f"{parts['language_model']}/config.json").read())
    embed = source_tensors(parts["language_model"])["model.embed_tokens.weight"]
    save_file({"model.embed_tokens.weight": embed}, str(partial / "model.safetensors"))
    cfg = stage_config(parts, "projector", 1e-3, language_model=str(partial), vision_tower=parts["vision_tower"])
    with pytest.raises(HFCheckpointError, match=r"partial_lm: tensor 'text\.layers\.0\..*' .* is missing"):
        train_and_evaluate(cfg, str(tmp_path / "run2"))
