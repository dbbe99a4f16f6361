"""Training from the parts as they ship (LLaVA's recipe): a transformers
LlamaForCausalLM, a CLIP tower and a pretrain-stage mm_projector.bin, through
LLaVA's two stages on the embedded task exported in LLaVA's training format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from PIL import Image
from safetensors.numpy import load_file, save_file

from export import main as export_main
from skipvision_jax.config import model_config_from_dict
from skipvision_jax.data.synthetic import WORDS
from skipvision_jax.data.tasks import export_llava_train
from skipvision_jax.generate import Generator
from skipvision_jax.inference import load_hf, load_trained
from skipvision_jax.interop import hf_model, llava_layout
from skipvision_jax.interop.hf_llava import HFCheckpointError
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.train.loop import train_and_evaluate
from tests.helpers import REPO, restore_params, subprocess_env, tiny_train_config
from tests.hf_tiny import make_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    paths = make_parts(str(root), words=WORDS + ["which?", "ring?", "square?", "dot?", "cross?", "object?", "there?"])
    data = export_llava_train(str(root / "data"), "train", 8)
    return {**paths, **data}


def stage_config(parts, trainable: str, lr: float, overrides: dict | None = None, **init):
    tokenizer = f"{parts['language_model']}/tokenizer.json"
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
            **(overrides or {}),
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


ALL_PARTS = ("language_model", "vision_tower", "projector")


@pytest.fixture(scope="module")
def stages(parts, tmp_path_factory):
    """LLaVA's two stages on the embedded task: stage 1 from the parts, stage 2 from stage 1."""
    root = tmp_path_factory.mktemp("stages")
    cfg1 = stage_config(parts, "projector", 1e-3, **{k: parts[k] for k in ALL_PARTS})
    train_and_evaluate(cfg1, str(root / "stage1"))
    cfg2 = stage_config(parts, "projector+decoder", 1e-3, checkpoint=str(root / "stage1"))
    train_and_evaluate(cfg2, str(root / "stage2"))
    return {"stage1": (str(root / "stage1"), cfg1), "stage2": (str(root / "stage2"), cfg2)}


def test_two_stages_from_the_parts(parts, stages):
    stage1, cfg1 = stages["stage1"]
    state1, _ = restore_params(stage1, cfg1)
    # Stage 1 trains the projector and the summary pool only.
    assert_tower_and_decoder_equal_the_sources(state1.params, parts)
    projector = torch.load(parts["projector"], weights_only=True)
    trained = state1.params["visual_tokens"]["projector"]["linear_1"]["kernel"]
    source = projector["model.mm_projector.0.weight"].numpy().T
    assert not np.array_equal(trained, source)  # it trained ...
    np.testing.assert_allclose(trained, source, atol=1e-2)  # ... from the file's weights (2 steps at 1e-3)
    assert "summary" in state1.params["visual_tokens"]

    # Stage 2 started from stage 1's params (a fresh optimizer) and trained the decoder too.
    stage2, cfg2 = stages["stage2"]
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


# ---------------------------------------------------------------- checkpoints out

QUESTION = "what color is the ring?"


def first_image(parts) -> str:
    return os.path.join(parts["images"], sorted(os.listdir(parts["images"]))[0])


def greedy_tokens(loaded, image: str) -> list[int]:
    """Eight greedy tokens, not stopping at `</s>`."""
    batch, model_cfg = loaded.make_batch(image, QUESTION)
    return np.asarray(Generator(model_cfg, KVPolicy.of("full"), 8)(loaded.params, batch).tokens[0]).tolist()


def test_llava_export_reads_back_with_the_same_params_and_greedy_tokens(parts, stages, tmp_path):
    stage2, _ = stages["stage2"]
    out = str(tmp_path / "llava")
    proc = subprocess.run(
        [
            sys.executable,
            "export.py",
            "--checkpoint",
            stage2,
            "--out",
            out,
            "--format",
            "llava",
        ],
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # LLaVA's names and config fields (llava_arch.py: mm_projector, vision_tower; the official model's ada).
    names = set(load_file(f"{out}/model.safetensors"))
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.mm_projector.0.weight",
        "model.mm_projector.2.bias",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
        "model.ada.0.weight",
        "model.ada.1.weight",
    ):
        assert name in names, name
    config = json.load(open(f"{out}/config.json"))
    assert config["model_type"] == "llava_llama" and config["mm_projector_type"] == "mlp2x_gelu"
    assert (config["mm_vision_select_layer"], config["mm_vision_select_feature"], config["use_zip"]) == (
        -2,
        "patch",
        False,
    )

    trained, read_back = load_trained(stage2), load_hf(out)
    flat_trained = traverse_util.flatten_dict(trained.params, sep="/")
    flat_read = traverse_util.flatten_dict(read_back.params, sep="/")
    assert flat_read.keys() == flat_trained.keys()
    for path, value in flat_trained.items():
        np.testing.assert_array_equal(np.asarray(flat_read[path]), np.asarray(value), err_msg=path)
    image = first_image(parts)
    assert read_back.make_batch(image, QUESTION)[0]["input_ids"].tolist() == (
        trained.make_batch(image, QUESTION)[0]["input_ids"].tolist()
    )
    for part in ("vision", "layout", "skip", "decoder"):  # the layout and Skip-FFN travel in config.json
        assert getattr(read_back.model_cfg, part) == getattr(trained.model_cfg, part), part
    assert greedy_tokens(read_back, image) == greedy_tokens(trained, image)

    # LLaVA's own releases ship PyTorch shards with an index: the same params from them.
    tensors = {name: torch.from_numpy(value) for name, value in load_file(f"{out}/model.safetensors").items()}
    os.remove(f"{out}/model.safetensors")
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, shard_names in shards.items():
        torch.save({name: tensors[name] for name in shard_names}, f"{out}/{shard}")
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    with open(f"{out}/pytorch_model.bin.index.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    from_bins = traverse_util.flatten_dict(hf_model.load(out).params, sep="/")
    for path, value in flat_trained.items():
        np.testing.assert_array_equal(np.asarray(from_bins[path]), np.asarray(value), err_msg=path)

    # `init_from_hf` starts a run from the LLaVA layout too (at lr 0 its params stay the export's).
    restarted = str(tmp_path / "restarted")
    cfg = stage_config(parts, "projector+decoder", 0.0, {"init_from_hf": out})
    train_and_evaluate(cfg, restarted)
    flat_restarted = traverse_util.flatten_dict(restore_params(restarted, cfg)[0].params, sep="/")
    for path, value in flat_trained.items():
        np.testing.assert_array_equal(np.asarray(flat_restarted[path]), np.asarray(value), err_msg=path)


def test_hf_export_loads_in_transformers_with_our_logits(parts, tmp_path):
    """A plain-layout run (transformers has no merge, summary tokens or Skip-FFN)."""
    plain = {
        "model.layout.num_kept": 16,
        "model.layout.merge_to": None,
        "model.layout.summary_tokens": False,
        "model.skip.enabled": False,
    }
    run = str(tmp_path / "plain")
    train_and_evaluate(stage_config(parts, "projector+decoder", 1e-3, plain, **{k: parts[k] for k in ALL_PARTS}), run)
    out = str(tmp_path / "hf")
    assert export_main(["--checkpoint", run, "--out", out, "--format", "hf"]) == 0
    processor = transformers.AutoProcessor.from_pretrained(out)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    image = first_image(parts)
    inputs = processor(images=Image.open(image), text=hf_model.chat_prompt(processor, QUESTION), return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits[0].numpy()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = inputs["input_ids"][0].numpy()
    trained = load_trained(run)
    batch, model_cfg = trained.make_batch(image, QUESTION)
    assert batch["input_ids"][0].tolist() == ids[ids != image_token].tolist()  # the run's own prompt
    # ... and its own pixels (the exported CLIP processor against data/images.py's preprocess).
    np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(1, 2, 0), batch["pixels"][0], atol=1e-5)
    ours = SkipVisionVLM(model_cfg).apply(
        {"params": trained.params}, batch["input_ids"], batch["text_mask"], batch["pixels"]
    )[0]
    assert np.abs(np.asarray(ours) - expected[ids != image_token]).max() <= 1e-4


def test_two_separate_pools_do_not_export_to_the_llava_layout(stages):
    stage2, _ = stages["stage2"]
    with open(os.path.join(stage2, "config.json")) as f:
        model = json.load(f)["model"]  # as the run resolved it (vocabulary, image offset)
    separate = model_config_from_dict({**model, "layout": {**model["layout"], "summary_pool": "separate"}})
    with pytest.raises(HFCheckpointError, match=r"^layout\.summary_pool: 'separate' has two summary pools"):
        llava_layout.llava_config_from_model(separate)
