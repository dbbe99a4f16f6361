"""orbax checkpoints of the train state and the data iterator, with a
fingerprint that catches a corrupt restore."""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from skipvision_jax.errors import CheckpointError

log = logging.getLogger(__name__)


@jax.jit
def fingerprint(tree) -> jax.Array:
    """sum |x| over every leaf, in float32: cheap, and wrong after a corrupt read."""
    return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


class Checkpointer:
    """Keeps the newest `keep` checkpoints in `directory`; restores the newest
    readable one, moving unreadable ones aside (never deleting them)."""

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state, data_state: dict) -> None:
        meta = {"data": data_state, "fingerprint": float(fingerprint(state)), "step": step}
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state):
        """(state, data_state) of the newest good checkpoint, or None if there is none.

        A newest checkpoint that cannot be read, or whose contents do not match
        the fingerprint saved with it, is moved to `<directory>/corrupt/` with a
        warning and the previous one is tried. Checkpoints that exist but none
        of which is readable raise CheckpointError: never a silent restart."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                saved, actual = restored["meta"]["fingerprint"], float(fingerprint(restored["state"]))
                if not np.isclose(saved, actual, rtol=1e-5):
                    raise ValueError(f"contents do not match the saved fingerprint ({actual} != {saved})")
            except Exception as err:  # orbax/tensorstore raise many types for a damaged file
                reason = str(err).splitlines()[0][:300]
                log.warning(
                    "checkpoint at step %d is unreadable (%s); moving it aside and trying the previous one",
                    step,
                    reason,
                )
                self._quarantine(step)
                continue
            return restored["state"], restored["meta"]["data"]
        if steps:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} (tried steps {steps}); refusing to restart from step 0"
            )
        return None

    def _quarantine(self, step: int) -> None:
        """Process 0 moves the checkpoint aside, once; the others wait for it."""
        if jax.process_index() == 0:
            target = os.path.join(self.directory, "corrupt", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
