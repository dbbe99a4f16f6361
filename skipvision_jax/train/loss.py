"""Next-token cross-entropy on answer tokens only."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int


def next_token_loss(
    logits: Float[Array, "B T V"], input_ids: Int[Array, "B T"], loss_mask: Bool[Array, "B T"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean cross-entropy of predicting token t+1 at text position t, over the
    positions whose target is marked in `loss_mask` (the answers).

    Returns (loss, number of target tokens).
    """
    targets = input_ids[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    count = weights.sum()
    return (nll * weights).sum() / jnp.maximum(count, 1.0), count
