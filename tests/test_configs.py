"""Every experiment in configs/ builds, validates and is sized from abstract
shapes (no weight allocated); the paper configurations have the published
parameter counts of their language models, the official Skip-Vision choices
and LLaVA's two training stages."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from skipvision_jax.config import validate_experiment
from skipvision_jax.experiment import sizing_model_config
from skipvision_jax.nn.shapes import abstract_params
from tests.helpers import REPO, subprocess_env

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if "__" not in p)
PAPER = ("llava15_7b", "skipvision_llama3_8b")
STAGED = [f"{name}:{stage}" for name in PAPER for stage in ("stage1", "stage2")]

# The language models' parameter counts as transformers reports them
# (`num_parameters()` of lmsys/vicuna-7b-v1.5 and meta-llama/Meta-Llama-3-8B-Instruct):
# decoder layers, final norm, untied embeddings and head.
LANGUAGE_MODEL_PARAMS = {"llava15_7b": 6_738_415_616, "skipvision_llama3_8b": 8_030_261_248}


def load(spec: str):
    """A config by `name` or `name:arg` (train.py's `--config configs/name.py:arg`)."""
    name, _, arg = spec.partition(":")
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(arg) if arg else module.get_config()


def param_counts(cfg) -> dict[str, int]:
    validate_experiment(cfg)
    params = abstract_params(sizing_model_config(cfg), None)
    return {part: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)) for part, tree in params.items()}


def test_every_config_file_is_covered():
    assert {"default", "detail", "easy_vqa", *PAPER} <= set(CONFIGS)


@pytest.mark.parametrize("spec", CONFIGS + STAGED)
def test_config_builds_validates_and_sizes(spec):
    counts = param_counts(load(spec))
    assert counts["decoder"] > 0 and counts["visual_tokens"] > 0
    name = spec.partition(":")[0]
    if name in LANGUAGE_MODEL_PARAMS:
        language_model = counts["decoder"] + counts["embed"] + counts["lm_head"] + counts["final_norm"]
        assert language_model == LANGUAGE_MODEL_PARAMS[name]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_take_the_official_choices(name):
    cfg = load(name)
    assert (cfg.model.layout.merge_method, cfg.model.layout.summary_pool) == ("official", "shared")
    # One pool (LayerNorm + Linear(d -> 1) at the decoder width) beside the projector.
    width, vision_width = cfg.model.decoder.width, cfg.model.vision.width
    projector = vision_width * width + width + width * width + width
    assert param_counts(cfg)["visual_tokens"] == projector + 2 * width + width + 1


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_have_llava_stages(name):
    stage1, stage2 = load(f"{name}:stage1"), load(f"{name}:stage2")
    assert (stage1.optimizer.trainable, stage1.optimizer.lr, stage1.train.batch_size) == ("projector", 1e-3, 256)
    assert (stage2.optimizer.trainable, stage2.optimizer.lr, stage2.train.batch_size) == (
        "projector+decoder",
        2e-5,
        128,
    )
    assert not stage1.model.scan_layers and not stage2.model.scan_layers  # the parts load into unrolled layers
    # The references' templates: LLaVA's scripts' --version plain / v1, the official code's llama3-plain / llama3.
    templates = {"llava15_7b": ("plain", "vicuna_v1"), "skipvision_llama3_8b": ("llama3_plain", "llama3")}[name]
    assert (stage1.data.template, stage2.data.template) == templates
    with pytest.raises(ValueError, match="stage3"):
        load(f"{name}:stage3")


def test_an_unknown_stage_on_the_command_line_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--workdir", str(tmp_path / "run"), "--config", "configs/llava15_7b.py:stage3"],
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unknown 'stage3'" in proc.stderr, proc.stderr
