"""Train state and the jitted train step."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from skipvision_jax.train.loss import next_token_loss

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The model's keyword inputs from a batch (pixels or precomputed features)."""
    image_key = "vision_features" if "vision_features" in batch else "pixels"
    return {"input_ids": batch["input_ids"], "text_mask": batch["text_mask"], image_key: batch[image_key]}


def make_loss_fn(model) -> Callable:
    def loss_fn(params, batch: Batch):
        logits = model.apply({"params": params}, **model_inputs(batch))
        loss, _ = next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss

    return loss_fn


def make_train_step(model, optimizer: optax.GradientTransformation) -> Callable[[TrainState, Batch], tuple[TrainState, jax.Array]]:
    loss_fn = make_loss_fn(model)

    def train_step(state: TrainState, batch: Batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), loss

    return train_step


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
