"""The picture of what the model keeps, checked against the layout's indices
and the caches: a tiny run whose 5 kept tokens are chosen by the class
token's attention and whose other 11 patches are merged to 4 skipped rows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skipvision_jax.inference import load_trained
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.visualize import GROUP_RGB, KEPT_RGB, draw, main, token_map
from tests.helpers import tiny_train_config

NUM_KEPT, MERGE_TO = 5, 4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from skipvision_jax.train.loop import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_train_config(
        **{
            "model.vision.pooled_grids": (),
            "model.vision.select_layer": -1,
            "model.layout.select": "cls_attention",
            "model.layout.num_kept": NUM_KEPT,
            "model.layout.merge_to": MERGE_TO,
            "train.steps": 2,
            "train.eval_every": 2,
            "train.checkpoint_every": 2,
        }
    )
    train_and_evaluate(cfg, workdir)
    return workdir, load_trained(workdir)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("image") / "scene.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def drawn_roles(token) -> np.ndarray:
    """The colours the roles panel drew, one per patch: the figure's own image data."""
    fig = draw(token)
    roles = fig.axes[1].images[1].get_array()
    return np.asarray(roles).reshape(-1, 3)


def test_the_cells_drawn_as_kept_are_the_layouts_kept_tokens(loaded, image):
    _, model = loaded
    token = token_map(model, Image.open(image), "what color is the ring ?")
    colours = drawn_roles(token)
    is_kept = np.all(np.isclose(colours, KEPT_RGB), axis=1)
    assert is_kept.sum() == NUM_KEPT == token.kept.sum()
    np.testing.assert_array_equal(is_kept, token.kept)
    # the kept ones are those the class token attends most
    assert set(np.argsort(-token.cls_attention)[:NUM_KEPT]) == set(np.flatnonzero(token.kept))
    # every other patch is drawn in its merge group's colour, the groups being the skipped rows
    groups = token.group[~token.kept]
    assert set(groups.tolist()) <= set(range(MERGE_TO)) and len(groups) == 16 - NUM_KEPT
    np.testing.assert_allclose(colours[~token.kept], [GROUP_RGB[g] for g in groups])


@pytest.mark.parametrize("policy, expected", [("skip_vision", "kept"), ("full", "all")])
def test_a_press_kept_keys_are_the_caches_positions(loaded, image, policy, expected):
    """skip_vision keeps exactly the kept tokens' keys (the skipped rows'
    dropped), in every layer and KV head; full keeps every key."""
    _, model = loaded
    token = token_map(model, Image.open(image), "what color is the ring ?", KVPolicy.of(policy))
    want = token.kept.astype(float) if expected == "kept" else np.ones(16)
    assert token.press_kept.shape == (model.model_cfg.decoder.num_layers, 16)
    for layer in token.press_kept:
        np.testing.assert_array_equal(layer, want)


def test_the_command_writes_the_picture(loaded, image, tmp_path, capsys):
    workdir, _ = loaded
    out = str(tmp_path / "map.png")
    main(
        [
            f"--checkpoint={workdir}",
            f"--image={image}",
            "--prompt=what color is the ring ?",
            f"--out={out}",
            "--kv-policy=snapkv",
            "--kv-compression=0.5",
        ]
    )
    assert Image.open(out).size[0] > 600
    assert '"kept": 5' in capsys.readouterr().out
