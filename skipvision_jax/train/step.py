"""Train state, the jitted train step (with gradient accumulation) and the eval step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from skipvision_jax.train.loss import next_token_loss
from skipvision_jax.train.optim import split_params

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any  # the whole model, frozen parts included
    opt_state: Any  # for the trainable parts only
    rng: jax.Array  # [2] uint32 raw key data, so that it checkpoints as a plain array
    trainable: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


def init_train_state(
    params, optimizer: optax.GradientTransformation, trainable: tuple[str, ...], seed: int
) -> TrainState:
    """The state at step 0. The optimizer's moments are float32 whatever the
    weights are held in (optax keeps a moment in its parameter's dtype), so
    bfloat16 weights still accumulate their updates' statistics in float32."""
    as_float32 = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(split_params(as_float32, trainable)[0]),
        rng=jax.random.key_data(jax.random.key(seed)),
        trainable=tuple(trainable),
    )


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The model's keyword inputs from a batch (pixels or precomputed features)."""
    image_key = "vision_features" if "vision_features" in batch else "pixels"
    return {"input_ids": batch["input_ids"], "text_mask": batch["text_mask"], image_key: batch[image_key]}


def _answer_token_count(batch: Batch) -> jax.Array:
    return jnp.maximum(batch["loss_mask"][:, 1:].sum(), 1).astype(jnp.float32)


def make_train_step(
    model, optimizer: optax.GradientTransformation, grad_accum: int = 1
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer update per call. With `grad_accum` > 1 the batch is split
    into that many micro-batches whose gradients are summed in a `lax.scan`
    (activations of one micro-batch at a time); the loss is normalized by the
    answer tokens of the whole batch, so the update equals the big-batch one."""

    def summed_loss(trainable, frozen, batch: Batch, rng, total_tokens):
        logits = model.apply({"params": {**trainable, **frozen}}, **model_inputs(batch), rngs={"dropout": rng})
        loss, count = next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss * count / total_tokens

    grad_fn = jax.value_and_grad(summed_loss)

    def train_step(state: TrainState, batch: Batch):
        trainable, frozen = split_params(state.params, state.trainable)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        total_tokens = _answer_token_count(batch)
        if grad_accum == 1:
            loss, grads = grad_fn(trainable, frozen, batch, rng, total_tokens)
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                loss, grads = grad_fn(trainable, frozen, micro_batch, jax.random.fold_in(rng, index), total_tokens)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params = {**optax.apply_updates(trainable, updates), **frozen}
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model, num_kinds: int = 0) -> Callable[[Any, Batch], dict]:
    """Sums over a batch of: exact matches (every answer token right under
    teacher forcing, which is exactly when greedy decoding reproduces the answer),
    correct answer tokens, answer tokens, examples (padding rows, which have no
    answer, excluded) and the summed loss."""

    def eval_step(params, batch: Batch):
        logits = model.apply({"params": params}, **model_inputs(batch))
        predicted = logits[:, :-1].argmax(-1)
        targets, mask = batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:]
        correct = (predicted == targets) & mask
        exact = jnp.all(correct | ~mask, axis=1) & mask.any(axis=1)
        loss, count = next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
        sums = {
            "exact": exact.sum(),
            "correct_tokens": correct.sum(),
            "tokens": mask.sum(),
            "examples": mask.any(axis=1).sum(),
            "loss_sum": loss * count,
        }
        if "kind" in batch:  # the embedded task's question kinds: exact matches per kind
            kinds = jax.nn.one_hot(batch["kind"], num_kinds) * mask.any(axis=1)[:, None]
            sums.update(exact_by_kind=(kinds * exact[:, None]).sum(0), examples_by_kind=kinds.sum(0))
        return sums

    return eval_step
