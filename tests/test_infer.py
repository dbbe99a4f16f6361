"""infer.py end to end on a tiny trained checkpoint, and its bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from skipvision_jax.data.synthetic import SyntheticVQA
from skipvision_jax.presses import POLICIES
from skipvision_jax.train.loop import train_and_evaluate
from tests.helpers import REPO, tiny_train_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("infer") / "run")
    train_and_evaluate(tiny_train_config(**{"train.steps": 4, "train.checkpoint_every": 4}), path)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    source = SyntheticVQA("val", 1)
    scene, _, _, _, rng = source.sample(0)
    path = str(tmp_path_factory.mktemp("images") / "scene.png")
    Image.fromarray((scene.render(rng) * 255).astype(np.uint8)).save(path)
    return path


def run_infer(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "infer.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_json_answer(workdir, image_path):
    proc = run_infer(
        f"--checkpoint={workdir}",
        f"--image={image_path}",
        "--prompt=What color is the ring?",
        "--kv-policy=skip_vision",
        "--max-new-tokens=3",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= {"text", "tokens", "prefill_ms", "decode_ms_per_token", "kv_slots", "policy"}
    assert result["policy"] == "skip_vision" and 1 <= len(result["tokens"]) <= 3 and result["prefill_ms"] > 0


def test_compare_policies_table(workdir, image_path):
    common = [
        f"--checkpoint={workdir}",
        f"--image={image_path}",
        "--prompt=how many objects are there ?",
        "--max_new_tokens=2",
        "--recent_window=4",
        "--sink_tokens=1",
        "--obs_window=2",
        "--compare_policies",
        "--json",
    ]
    proc = run_infer(*common)
    assert proc.returncode == 0, proc.stderr
    rows = {r["policy"]: r for r in json.loads(proc.stdout)}
    assert list(rows) == list(POLICIES)
    full_slots = rows["full"]["kv_slots"]
    assert all(rows[name]["kv_slots"] < full_slots for name in POLICIES[1:])
    # With a budget that holds the whole cache, no pruning policy may answer differently from full.
    proc = run_infer(*common, f"--kv-budget={full_slots}")
    assert proc.returncode == 0, proc.stderr
    unpruned = {r["policy"]: r for r in json.loads(proc.stdout)}
    for name in (name for name in POLICIES if name != "skip_vision"):
        assert unpruned[name]["agrees_with_full"] and unpruned[name]["tokens"] == rows["full"]["tokens"], name


@pytest.fixture(scope="module")
def corrupt_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
    return str(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"image": "/nonexistent/x.png"}, "image not found"),
        ({"image": "CORRUPT"}, "cannot decode image"),
        ({"prompt": "   "}, "prompt: empty"),
        ({"prompt": "what " * 20}, "prompt: 21 tokens exceed"),
        ({"prompt": "what colour is it ?"}, "not in the vocabulary"),
        ({"kv_policy": "h2o", "kv_budget": "4"}, "kv.budget: 4 is smaller than the 21 slots the h2o policy needs"),
        (
            {"kv_policy": "snapkv", "kv_budget": "20", "kv_compression": "0.5"},
            "kv.compression: give a budget or a compression ratio, not both",
        ),
        ({"kv_policy": "knorm", "kv_compression": "1.5"}, "kv.compression: must be in [0, 1), got 1.5"),
        ({"kv_policy": "lru"}, "kv.policy: unknown 'lru'"),
        ({"checkpoint": "/nonexistent/run"}, "no checkpoint at /nonexistent/run"),
    ],
)
def test_bad_input_is_a_one_line_error(workdir, image_path, corrupt_image, override, message):
    args = {"checkpoint": workdir, "image": image_path, "prompt": "how many objects are there ?", **override}
    if args["image"] == "CORRUPT":
        args["image"] = corrupt_image
    proc = run_infer(*[f"--{k}={v}" for k, v in args.items()])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
