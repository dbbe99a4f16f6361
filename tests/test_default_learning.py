"""The README's main job (`python train.py --workdir runs/default`) keeps its pace.

The embedded task's position question is learnt late and is sensitive to what
the default trains: a change to the data order, the question mix, the
initialization, the model or the schedule moves it (issue 28). The cheap
guard runs the default's first 100 steps on the default's own schedule and
checks the validation loss against the figure recorded here; the slow one
runs the whole default and checks every question kind."""

from __future__ import annotations

import pytest

from configs.default import get_config
from skipvision_jax.train.loop import train_and_evaluate

# After the default's first 100 steps (its 200-step warm-up and its cosine over
# train.steps), recorded on this project's 2-core CPU with jax 0.10.2: the
# training loss at step 100 and the validation loss. Runs agree bitwise across
# commits that do not change what the default trains; another machine's XLA
# rounded the earlier default's step-100 loss differently by 3e-7 relative.
# Deliberate changes moved the training loss by: question mix back to uniform
# +12.3%, ToMe's merge +0.39%, one shared summary pool -0.0064%; lr halved moved
# the validation loss by +34%. The bands sit between.
RECORDED_TRAIN_LOSS_AT_100 = 1.0211721658706665
RECORDED_VAL_LOSS_AT_100 = 1.140392077445984
TRAIN_LOSS_BAND = 2e-5  # relative
VAL_LOSS_BAND = 0.03  # relative


def default_config(**train):
    cfg = get_config()
    cfg.optimizer.decay_steps = cfg.train.steps  # the full run's schedule, stopped early
    cfg.train.update(train)
    return cfg


def test_default_learns_at_its_recorded_pace(tmp_path):
    last = train_and_evaluate(
        default_config(steps=100, eval_every=100, log_every=100, checkpoint_every=100), str(tmp_path)
    )
    assert last["loss"] == pytest.approx(RECORDED_TRAIN_LOSS_AT_100, rel=TRAIN_LOSS_BAND), last
    assert last["val_loss"] == pytest.approx(RECORDED_VAL_LOSS_AT_100, rel=VAL_LOSS_BAND), last


@pytest.mark.slow
def test_default_reaches_95_percent_on_every_question_kind(tmp_path):
    last = train_and_evaluate(default_config(), str(tmp_path))
    kinds = {key: value for key, value in last.items() if key.startswith("val_exact_match_") and "chance" not in key}
    assert len(kinds) == 4 and min(kinds.values()) >= 0.95, kinds
