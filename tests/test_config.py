import dataclasses

import pytest

from skipvision_jax.config import (
    FastVConfig,
    LayoutConfig,
    SkipConfig,
    VisionConfig,
    model_config_from_dict,
)
from tests.conftest import TINY_DECODER, TINY_VISION, tiny_config


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: tiny_config(layout=LayoutConfig(num_kept=17, summary_tokens=False)), "layout.num_kept"),
        (lambda: tiny_config(layout=LayoutConfig(num_kept=6, merge_to=11)), "layout.merge_to"),
        (lambda: dataclasses.replace(TINY_DECODER, num_heads=5), "decoder.num_heads"),
        (lambda: dataclasses.replace(TINY_DECODER, num_kv_heads=3), "decoder.num_kv_heads"),
        (lambda: dataclasses.replace(TINY_VISION, num_heads=3), "vision.num_heads"),
        (lambda: SkipConfig(partition="random"), "skip.partition"),
        (lambda: tiny_config(dtype="float16"), "dtype"),
        (lambda: tiny_config(skip=SkipConfig(layer_start=1, layer_end=7)), "skip.layer_end"),
        (lambda: VisionConfig(image_size=30, patch_size=4), "vision.patch_size"),
        (lambda: tiny_config(layout=LayoutConfig(num_kept=16, summary_tokens=True)), "layout.summary_tokens"),
        (lambda: model_config_from_dict({"decoder": {"widht": 8}}), "model.decoder"),
        (lambda: model_config_from_dict({"optimizer": {}}), "model"),
        (lambda: FastVConfig(layer=1, keep=0), "fastv.keep"),
        (lambda: tiny_config(skip=SkipConfig(enabled=False), fastv=FastVConfig(layer=3, keep=2)), "fastv.layer"),
        (lambda: tiny_config(fastv=FastVConfig(layer=1, keep=2)), "fastv.layer"),
        (lambda: tiny_config(skip=SkipConfig(enabled=False), fastv=FastVConfig(layer=1, keep=99)), "fastv.keep"),
        (lambda: LayoutConfig(num_kept=4, merge_to=3, drop_fine=True), "layout.drop_fine"),
        (
            lambda: tiny_config(layout=LayoutConfig(num_kept=4, drop_fine=True, summary_tokens=True)),
            "layout.summary_tokens",
        ),
    ],
)
def test_bad_values_raise_one_line_value_error_naming_the_field(build, field):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert "\n" not in message


def test_valid_config_round_trips_from_dict():
    cfg = tiny_config()
    rebuilt = model_config_from_dict(dataclasses.asdict(cfg))
    assert rebuilt == cfg
    assert cfg.num_skipped == 5
    assert list(cfg.skip_layers) == [0, 1, 2]
