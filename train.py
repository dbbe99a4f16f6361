"""Train a Skip-Vision model.

    python train.py --workdir DIR [--config configs/X.py] [--config.train.steps=100 ...]

Resumes from the newest good checkpoint in DIR. Bad input (config key or
value, data, checkpoint) exits non-zero with a one-line error.
"""

from __future__ import annotations

import json
import os

from absl import flags

from skipvision_jax import cli
from skipvision_jax.data.llava import BadRecord
from skipvision_jax.train.checkpoint import CheckpointError
from skipvision_jax.train.loop import TrainingDiverged, train_and_evaluate

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.", required=True)
cli.define_distributed_flags()
cli.define_config_flag(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"))


def main() -> None:
    print(json.dumps(train_and_evaluate(cli.load_config(), flags.FLAGS.workdir)))


if __name__ == "__main__":
    cli.run(main, (ValueError, BadRecord, CheckpointError, TrainingDiverged))
