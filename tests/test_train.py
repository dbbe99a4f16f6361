"""Training: exact resume, SIGTERM, NaN, corrupt checkpoints, accumulation, frozen parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from skipvision_jax.data.pipeline import DataSpec, text_format
from skipvision_jax.data.synthetic import SyntheticVQA
from skipvision_jax.experiment import build_model_config, with_data_settings
from skipvision_jax.train.checkpoint import CheckpointError
from skipvision_jax.train.loop import TrainingDiverged, train_and_evaluate
from skipvision_jax.train.step import make_train_step
from tests.helpers import (
    REPO,
    override_flags,
    read_metrics,
    restore_params,
    state_plan,
    tiny_train_config,
)


def test_resume_is_bitwise_exact(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_and_evaluate(tiny_train_config(), straight)
    train_and_evaluate(tiny_train_config(**{"train.steps": 6}), resumed)
    assert [m["step"] for m in read_metrics(resumed)] == list(range(1, 7))
    train_and_evaluate(tiny_train_config(), resumed)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 13))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert a[-1]["val_exact_match"] == b[-1]["val_exact_match"]
    state_a, data_a = restore_params(straight, tiny_train_config())
    state_b, data_b = restore_params(resumed, tiny_train_config())
    assert int(state_a.step) == int(state_b.step) == 12 and data_a == data_b
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(x, y)


def test_scanned_layers_train_checkpoint_resume_and_decode(tmp_path):
    """train.py with scan_layers=True: trains, checkpoints at step 3, resumes
    to step 6 with the losses of an uninterrupted run, and infer.py decodes it."""
    scanned = {"model.scan_layers": True, "train.checkpoint_every": 3, "train.eval_every": 6}
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_and_evaluate(tiny_train_config(**scanned, **{"train.steps": 6}), straight)
    train = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={resumed}"]
    for steps in (3, 6):
        flags = override_flags(**scanned, **{"train.steps": steps})
        proc = subprocess.run(train + flags, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["loss"] for m in read_metrics(resumed)] == [m["loss"] for m in read_metrics(straight)]
    assert "layers_0_2" in restore_params(resumed, tiny_train_config(**scanned))[0].params["decoder"]  # stacked
    image = tmp_path / "scene.png"
    scene, _, _, _, rng = SyntheticVQA("val", 1).sample(0)
    Image.fromarray((scene.render(rng) * 255).round().astype(np.uint8)).save(image)
    infer = [sys.executable, os.path.join(REPO, "infer.py"), f"--checkpoint={resumed}", f"--image={image}"]
    proc = subprocess.run(
        infer + ["--prompt=How many objects are there?", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads(proc.stdout)["tokens"]) >= 1


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(tiny_train_config(**{"train.steps": 6}), workdir)
    before, _ = restore_params(workdir, tiny_train_config())
    with pytest.raises(TrainingDiverged, match="loss is (nan|inf)"):
        train_and_evaluate(tiny_train_config(**{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0}), workdir)
    after, _ = restore_params(workdir, tiny_train_config())
    assert int(after.step) == 6
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)


def _truncate_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    workdir = str(tmp_path)
    train_and_evaluate(tiny_train_config(), workdir)  # checkpoints at 6 and 12
    _truncate_files(os.path.join(workdir, "checkpoints", "12", "state"))
    with caplog.at_level("WARNING"):
        last = train_and_evaluate(tiny_train_config(**{"train.steps": 14}), workdir)
    assert "checkpoint at step 12 is unreadable" in caplog.text
    assert os.listdir(os.path.join(workdir, "checkpoints", "corrupt"))
    steps = [m["step"] for m in read_metrics(workdir)]
    assert steps == list(range(1, 15)) and last["step"] == 14  # resumed at 6, not 0; no step logged twice


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path):
    workdir = str(tmp_path)
    train_and_evaluate(tiny_train_config(**{"train.steps": 6}), workdir)
    _truncate_files(os.path.join(workdir, "checkpoints", "6", "state"))
    with pytest.raises(CheckpointError, match="refusing to restart from step 0"):
        train_and_evaluate(tiny_train_config(), workdir)


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    workdir = str(tmp_path)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}"] + override_flags(
        **{"train.steps": 100000, "train.checkpoint_every": 100000, "train.eval_every": 100000}
    )
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = json.loads(out.strip().splitlines()[-1])["step"]
    assert 3 <= saved < 100000
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved)))
    last = train_and_evaluate(tiny_train_config(**{"train.steps": saved + 2}), workdir)
    assert last["step"] == saved + 2
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, saved + 3))


def test_bad_config_override_is_a_one_line_error():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--workdir=/tmp/unused", "--config.train.stepz=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad config override") and "steps" in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.steps=-5"], "error: train.steps: must be an integer > 0, got -5"),
        (["--config.optimizer.lr=-1"], "error: optimizer.lr: must be >= 0, got -1.0"),
        (["--config.optimizer.b2=1.0"], "error: optimizer.b2: must be in [0, 1), got 1.0"),
        (["--config.train.eval_batches=0"], "error: train.eval_batches: must be an integer > 0 or -1 (all), got 0"),
        (["--config.data.text_len=1"], "error: data.text_len: must be an integer >= 2 or 0 (from the data), got 1"),
        # what follows from the data may be given, but not wrong (and nothing is written first)
        (["--config.model.layout.image_offset=5"], "model.layout.image_offset: 5, but the data puts the image after 1"),
        (["--config.model.decoder.vocab_size=8"], "model.decoder.vocab_size: 8 is smaller than the tokenizer's 33"),
        (["--config=/nonexistent/exp.py"], "error: --config: no such file /nonexistent/exp.py"),
        (["--config=BROKEN"], "line 1: '(' was never closed"),
    ],
)
def test_config_values_that_cannot_be_right_are_refused(tmp_path, args, message):
    broken = tmp_path / "broken.py"
    broken.write_text("x = (\n")
    workdir = tmp_path / "run"
    args = [arg.replace("BROKEN", str(broken)) for arg in args]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--workdir={workdir}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not workdir.exists()  # refused before anything is written


def _one_step(cfg, batch, grad_accum):
    model, optimizer, plan = state_plan(cfg)
    state = plan.create()
    before = state.params
    new_state, metrics = jax.jit(make_train_step(model, optimizer, grad_accum))(state, batch)
    return before, new_state, metrics


def _batch(cfg):
    data = DataSpec(cfg.data, text_format(cfg.data), cfg.model.vision.image_size)
    return next(data.train_iterator(cfg.train.batch_size, seed=0))


def test_gradient_accumulation_matches_the_full_batch_update():
    cfg = tiny_train_config(**{"optimizer.warmup_steps": 0})  # a non-zero first learning rate
    batch = _batch(cfg)
    with jax.default_matmul_precision("float32"):
        before, full, m_full = _one_step(cfg, batch, 1)
        _, accumulated, m_acc = _one_step(cfg, batch, 4)
    np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
    # Adam's first update is about lr * sign(g) (5e-4): a gradient at rounding
    # level can move its weight by a fraction of that either way, so the
    # absolute tolerance is a tenth of the learning rate.
    for x, y in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=5e-5)
    assert any(np.any(x != y) for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(before)))


def test_frozen_parts_get_no_optimizer_state_and_do_not_move():
    cfg = tiny_train_config(**{"optimizer.trainable": "projector", "optimizer.warmup_steps": 0})
    before, after, _ = _one_step(cfg, _batch(cfg), 1)
    adam_state = after.opt_state[1][0]
    assert set(adam_state.mu) == {"visual_tokens"}
    for name in ("vision", "decoder", "embed", "lm_head"):
        for x, y in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after.params[name])):
            np.testing.assert_array_equal(x, y)
    moved = [
        np.any(x != y)
        for x, y in zip(jax.tree.leaves(before["visual_tokens"]), jax.tree.leaves(after.params["visual_tokens"]))
    ]
    assert all(moved)


def test_trainer_and_interop_plan_the_same_params():
    """One setup module: the train state's params and the params interop loads
    into are planned from the same init inputs, so their trees agree."""
    from skipvision_jax.nn.shapes import abstract_params

    cfg = tiny_train_config()
    _, _, plan = state_plan(cfg)
    text = text_format(cfg.data)
    model_cfg = build_model_config(with_data_settings(cfg, text), text)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(plan.abstract.params) == shapes(abstract_params(model_cfg, None))
