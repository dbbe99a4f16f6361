"""Compilation counts and compiled FLOPs of the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from skipvision_jax.config import (
    DecoderConfig,
    LayoutConfig,
    ModelConfig,
    SkipConfig,
    VisionConfig,
)
from skipvision_jax.flops import train_step_flops
from skipvision_jax.train.optim import TRAINABLE_PRESETS
from skipvision_jax.train.step import init_train_state, make_train_step
from tests.conftest import init_params, tiny_batch, tiny_config


def test_repeated_train_steps_compile_once(compile_counter):
    cfg = tiny_config()
    model, params = init_params(cfg)
    optimizer = optax.adamw(1e-3)
    state = init_train_state(params, optimizer, TRAINABLE_PRESETS["all"], seed=0)
    step = jax.jit(make_train_step(model, optimizer))
    batches = [tiny_batch(cfg, seed=s) for s in range(4)]
    jax.block_until_ready(batches)
    before = compile_counter.count
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert compile_counter.count - before == 1
    assert len(set(losses)) == 4  # real steps on different data, not a cached result
    assert int(state.step) == 4


# Big enough that matrix products dominate, small enough to compile in seconds.
FLOPS_VISION = VisionConfig(image_size=32, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=32)  # 64 patches
FLOPS_DECODER = DecoderConfig(vocab_size=128, width=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256)


def _compiled_train_step_flops(cfg: ModelConfig, num_text: int, batch: int) -> float:
    from skipvision_jax.nn import SkipVisionVLM

    model = SkipVisionVLM(cfg)
    inputs = {
        "input_ids": jnp.zeros((batch, num_text), jnp.int32),
        "text_mask": jnp.ones((batch, num_text), bool),
        "loss_mask": jnp.ones((batch, num_text), bool),
        "vision_features": jnp.ones((batch, cfg.vision.num_features, cfg.vision.width)),
    }
    params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), inputs["input_ids"], inputs["text_mask"], vision_features=inputs["vision_features"]
        )
    )["params"]
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), __import__("flax").linen.unbox(params))
    optimizer = optax.sgd(1e-3)
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer, TRAINABLE_PRESETS["all"], seed=0), params)
    cost = jax.jit(make_train_step(model, optimizer)).lower(state, inputs).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_train_step_flops_fall_with_skipped_share_and_match_the_analytic_count():
    num_text, batch = 16, 2
    shares = {}
    for kept in (64, 48, 32, 16):  # 0%, 25%, 50%, 75% of the 64 visual tokens skipped
        cfg = ModelConfig(
            FLOPS_VISION, LayoutConfig(num_kept=kept, summary_tokens=False), SkipConfig(enabled=True), FLOPS_DECODER
        )
        shares[kept] = (_compiled_train_step_flops(cfg, num_text, batch), train_step_flops(cfg, num_text, batch))
    compiled = np.array([c for c, _ in shares.values()])
    analytic = np.array([a for _, a in shares.values()])
    assert np.all(np.diff(compiled) < 0), compiled
    compiled_ratio, analytic_ratio = compiled / compiled[0], analytic / analytic[0]
    np.testing.assert_allclose(compiled_ratio, analytic_ratio, rtol=0.10)
    # The absolute count agrees too: the analytic model leaves out only element-wise work.
    np.testing.assert_allclose(compiled, analytic, rtol=0.15)
