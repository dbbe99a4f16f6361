"""Training: state, loss, step, evaluation, checkpoints."""
