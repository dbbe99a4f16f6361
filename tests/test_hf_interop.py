"""Hugging Face LLaVA in and out, against transformers on PyTorch (CPU, fp32)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch  # a missing torch fails here rather than skipping: it is in the test extras
import transformers
from PIL import Image

from skipvision_jax.generate import Generator
from skipvision_jax.interop import hf_llava, hf_model
from skipvision_jax.interop.hf_llava import HFCheckpointError
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.nn import SkipVisionVLM
from skipvision_jax.presses import POLICIES
from tests.conftest import init_params
from tests.helpers import REPO, subprocess_env
from tests.hf_tiny import make_hf_llava, write_image

QUESTION = "what is in the picture ?"


@pytest.fixture(scope="module", params=["gqa", "mha_odd"])
def hf_dir(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    torch_model = make_hf_llava(directory, request.param)
    return directory, torch_model


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    return write_image(str(tmp_path_factory.mktemp("img") / "image.png"))


def torch_inputs(hf, image_path):
    return hf.processor(
        images=Image.open(image_path), text=hf_model.chat_prompt(hf.processor, QUESTION), return_tensors="pt"
    )


def torch_text_logits(torch_model, inputs, image_token_id) -> np.ndarray:
    with torch.no_grad():
        logits = torch_model(**inputs).logits[0].numpy()
    return logits[inputs["input_ids"][0].numpy() != image_token_id]


def our_logits(params, cfg, batch) -> np.ndarray:
    return np.asarray(
        SkipVisionVLM(cfg).apply({"params": params}, batch["input_ids"], batch["text_mask"], batch["pixels"])[0]
    )


def test_imported_logits_match_transformers(hf_dir, image_path):
    directory, torch_model = hf_dir
    hf = hf_model.load(directory)
    batch, cfg = hf_model.encode(hf, Image.open(image_path), QUESTION)
    expected = torch_text_logits(torch_model, torch_inputs(hf, image_path), hf.image_token_id)
    assert np.abs(our_logits(hf.params, cfg, batch) - expected).max() <= 1e-4


def test_greedy_generation_matches_transformers_generate(hf_dir, image_path):
    directory, torch_model = hf_dir
    hf = hf_model.load(directory)
    batch, cfg = hf_model.encode(hf, Image.open(image_path), QUESTION)
    inputs = torch_inputs(hf, image_path)
    with torch.no_grad():
        generated = torch_model.generate(**inputs, max_new_tokens=16, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ].numpy()
    state = Generator(cfg, KVPolicy.of("full"), 16, stop_ids=hf_model.stop_ids(hf), pad_id=3)(hf.params, batch)
    ours = np.asarray(state.tokens[0])[: len(generated)]
    assert len(generated) >= 8  # a real sequence, not an immediate stop
    np.testing.assert_array_equal(ours, generated)


def test_export_reloads_in_transformers_with_identical_logits(hf_dir, image_path, tmp_path):
    directory, torch_model = hf_dir
    hf = hf_model.load(directory)
    hf_llava.save(str(tmp_path), hf.params, hf.model_cfg, hf.image_token_id, base_config=hf.hf_config, unused=hf.unused)
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    inputs = torch_inputs(hf, image_path)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(**inputs).logits.numpy(), torch_model(**inputs).logits.numpy())


def test_a_model_of_ours_exports_to_transformers(hf_dir, image_path, tmp_path):
    """Our own (random) weights, with only the vision layers up to the selected one."""
    directory, _ = hf_dir
    hf = hf_model.load(directory)
    batch, cfg = hf_model.encode(hf, Image.open(image_path), QUESTION)
    _, params = init_params(cfg, seed=3)
    shutil.copytree(directory, str(tmp_path), dirs_exist_ok=True)  # tokenizer and processor files
    hf_llava.save(str(tmp_path), params, cfg, hf.image_token_id)
    exported = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    expected = torch_text_logits(exported, torch_inputs(hf, image_path), hf.image_token_id)
    assert np.abs(our_logits(params, cfg, batch) - expected).max() <= 1e-4


ON_MESH = """
import json, sys, jax, numpy as np
from PIL import Image
from skipvision_jax import sharding
from skipvision_jax.interop import hf_model
from skipvision_jax.nn import SkipVisionVLM
directory, image = sys.argv[1:3]
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
hf = hf_model.load(directory, mesh)
batch, cfg = hf_model.encode(hf, Image.open(image), "what is in the picture ?")
with sharding.activate(mesh, sharding.DEFAULT_RULES):
    logits = jax.jit(SkipVisionVLM(cfg).apply)({"params": hf.params}, batch["input_ids"], batch["text_mask"], batch["pixels"])
q = hf.params["decoder"]["layer_0"]["attn"]["q_proj"]["kernel"]
print(json.dumps({"q_shape": q.shape, "q_shard": q.addressable_shards[0].data.shape, "logits": np.asarray(logits).tolist()}))
"""


def test_loading_onto_a_mesh_shards_each_weight_and_computes_the_same(hf_dir, image_path):
    directory, torch_model = hf_dir
    env = subprocess_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", ON_MESH, directory, image_path],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    width, heads, head_dim = result["q_shape"]
    assert result["q_shard"] == [
        width // 2 if width % 2 == 0 else width,
        heads // 2 if heads % 2 == 0 else heads,
        head_dim,
    ]
    assert result["q_shard"] != result["q_shape"]
    hf = hf_model.load(directory)
    expected = torch_text_logits(torch_model, torch_inputs(hf, image_path), hf.image_token_id)
    assert np.abs(np.asarray(result["logits"])[0] - expected).max() <= 1e-4


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """The gqa variant alone, for tests that need one directory (and may copy and damage it)."""
    directory = str(tmp_path_factory.mktemp("gqa_single"))
    make_hf_llava(directory, "gqa")
    return directory


def _broken_copy(directory, tmp_path, name):
    target = str(tmp_path / name)
    shutil.copytree(directory, target)
    return target


def _edit_config(directory, edit):
    path = os.path.join(directory, "config.json")
    config = json.load(open(path))
    edit(config)
    json.dump(config, open(path, "w"))


def test_llama3_rope_scaling_matches_transformers(tmp_path, image_path):
    """A Llama 3.1-style text model (rope_type llama3): logits and 16 greedy
    tokens as transformers computes them, and the scaling survives export."""
    torch_model = make_hf_llava(str(tmp_path / "llama3"), "gqa_llama3")
    hf = hf_model.load(str(tmp_path / "llama3"))
    assert hf.model_cfg.decoder.rope_llama3_scaling == (8.0, 1.0, 4.0, 64)
    batch, cfg = hf_model.encode(hf, Image.open(image_path), QUESTION)
    inputs = torch_inputs(hf, image_path)
    expected = torch_text_logits(torch_model, inputs, hf.image_token_id)
    assert np.abs(our_logits(hf.params, cfg, batch) - expected).max() <= 1e-4
    plain = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, rope_llama3_scaling=None))
    # The scaling matters here: without it the logits leave the 1e-4 parity by far (8.9e-4 with
    # transformers 5.2's random init, 2e-3 or more with 5.24's).
    assert np.abs(our_logits(hf.params, plain, batch) - expected).max() > 5e-4
    with torch.no_grad():
        generated = torch_model.generate(**inputs, max_new_tokens=16, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ].numpy()
    state = Generator(cfg, KVPolicy.of("full"), 16, stop_ids=hf_model.stop_ids(hf), pad_id=3)(hf.params, batch)
    np.testing.assert_array_equal(np.asarray(state.tokens[0])[: len(generated)], generated)
    exported = hf_llava.hf_config_from_model(hf.model_cfg, hf.image_token_id, hf.hf_config)
    assert hf_llava.model_config_from_hf(exported).decoder.rope_llama3_scaling == (8.0, 1.0, 4.0, 64)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_shard", r"missing shard\(s\) \['model-00002-of-00002.safetensors'\]"),
        (
            "wrong_shape",
            # the first MLP tensor read (files are read tensor by tensor, in their order)
            r"tensor language_model.model.layers.0.mlp.\w+_proj.weight of shape \[.*\] does not fit decoder/layer_0/mlp/\w+/kernel",
        ),
        ("rope_scaling", r"text_config.rope_scaling: rope type 'yarn' is not supported"),
        ("feature_layers", r"vision_feature_layer: \[-2, -1\] is not supported"),
        ("mistral", r"text_config.model_type: 'mistral' is not supported"),
        ("no_weights", r"no model.safetensors, pytorch_model.bin or their .index.json"),
    ],
)
def test_malformed_directories_fail_with_a_clear_error(gqa_dir, tmp_path, damage, message):
    broken = _broken_copy(gqa_dir, tmp_path, damage)
    weights = os.path.join(broken, "model.safetensors")
    if damage == "missing_shard":
        index = {
            "metadata": {},
            "weight_map": {
                "language_model.model.norm.weight": "model-00001-of-00002.safetensors",
                "lm_head.weight": "model-00002-of-00002.safetensors",
            },
        }
        os.rename(weights, os.path.join(broken, "model-00001-of-00002.safetensors"))
        json.dump(index, open(os.path.join(broken, "model.safetensors.index.json"), "w"))
    elif damage == "wrong_shape":
        _edit_config(
            broken, lambda c: c["text_config"].update(intermediate_size=c["text_config"]["intermediate_size"] + 2)
        )
    elif damage == "rope_scaling":
        _edit_config(
            broken,
            lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0}),
        )
    elif damage == "feature_layers":
        _edit_config(broken, lambda c: c.update(vision_feature_layer=[-2, -1]))
    elif damage == "mistral":
        _edit_config(broken, lambda c: c["text_config"].update(model_type="mistral"))
    else:
        os.remove(weights)
    with pytest.raises(HFCheckpointError, match=message):
        hf_model.load(broken)


@pytest.mark.slow  # every press through infer.py is also tests/test_infer.py's, on a trained run; CI time
def test_infer_cli_runs_every_policy_on_a_hf_checkpoint(gqa_dir, image_path):
    directory = gqa_dir
    proc = subprocess.run(
        [
            sys.executable,
            "infer.py",
            f"--hf-checkpoint={directory}",
            f"--image={image_path}",
            f"--prompt={QUESTION}",
            "--max-new-tokens=4",
            "--recent-window=4",
            "--sink-tokens=1",
            "--obs-window=2",
            "--compare-policies",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [row["policy"] for row in rows] == list(POLICIES)
    assert all(len(row["tokens"]) >= 1 for row in rows)


def test_train_cli_fine_tunes_from_a_hf_checkpoint_with_skip_ffn(gqa_dir, tmp_path):
    from tests.helpers import restore_params, tiny_train_config

    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, answer in enumerate(["a red square", "two", "a blue ring", "left"]):
        write_image(str(images / f"{i}.png"), seed=i)
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat is in the picture ?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    json.dump(records, open(tmp_path / "data.json", "w"))
    tokenizer_path = os.path.join(gqa_dir, "tokenizer.json")
    overrides = {
        "init_from_hf": gqa_dir,
        "data.kind": "llava",
        "data.json_path": str(tmp_path / "data.json"),
        "data.val_json_path": str(tmp_path / "data.json"),
        "data.image_dir": str(images),
        "data.tokenizer": tokenizer_path,
        "data.text_len": 40,
        "model.layout.num_kept": 4,
        "model.layout.merge_to": 6,
        "model.layout.summary_tokens": True,
        "model.skip.enabled": True,
        "train.steps": 2,
        "train.batch_size": 2,
        "train.eval_every": 2,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "optimizer.lr": 0.0,  # the checkpoint must then hold exactly the imported weights
    }
    workdir = str(tmp_path / "run")
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(
        [sys.executable, "train.py", f"--workdir={workdir}", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.isfinite(json.loads(proc.stdout.strip().splitlines()[-1])["loss"])
    cfg = tiny_train_config(**overrides)
    state, _ = restore_params(workdir, cfg)
    imported = hf_model.load(gqa_dir).params
    np.testing.assert_array_equal(
        state.params["decoder"]["layer_2"]["mlp"]["down"]["kernel"],
        imported["decoder"]["layer_2"]["mlp"]["down"]["kernel"],
    )
    np.testing.assert_array_equal(state.params["vision"]["pos_embed"], imported["vision"]["pos_embed"])
    assert "summary_skipped" in state.params["visual_tokens"]  # Skip-Vision's own part, freshly initialized


def test_eval_cli_batches_mixed_prompt_lengths_as_transformers_generates_each(gqa_dir, tmp_path):
    """eval.py --hf-checkpoint: four questions of different lengths decoded in
    one padded batch, each answer the text of transformers' greedy generate."""
    from skipvision_jax.vqa import files

    questions = ["what is in the picture ?", "red ?", "a blue square ring ?", "one two three"]
    for i in range(2):
        write_image(str(tmp_path / f"{i}.png"), seed=i)
    lines = [{"question_id": f"q{i}", "image": f"{i % 2}.png", "text": text} for i, text in enumerate(questions)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers_path = str(tmp_path / "answers.jsonl")
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"--hf-checkpoint={gqa_dir}",
            f"--question-file={tmp_path / 'q.jsonl'}",
            f"--image-folder={tmp_path}",
            f"--answers-file={answers_path}",
            "--batch-size=4",
            "--max-new-tokens=12",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = {a["question_id"]: a for a in files.read_answers(answers_path)}
    assert len({a["metadata"]["bucket"] for a in answers.values()}) == 1  # one batch, padded to one length
    torch_model = transformers.LlavaForConditionalGeneration.from_pretrained(gqa_dir).eval()
    hf = hf_model.load(gqa_dir)
    tokenizer = hf.processor.tokenizer
    lengths = set()
    for line in lines:
        inputs = hf.processor(
            images=Image.open(tmp_path / line["image"]),
            text=hf_model.chat_prompt(hf.processor, line["text"]),
            return_tensors="pt",
        )
        lengths.add(inputs["input_ids"].shape[1])
        with torch.no_grad():
            generated = torch_model.generate(**inputs, max_new_tokens=12, do_sample=False)[
                0, inputs["input_ids"].shape[1] :
            ].tolist()
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        assert answers[line["question_id"]]["text"] == tokenizer.decode(generated, skip_special_tokens=True), line
    assert len(lengths) == len(questions)
