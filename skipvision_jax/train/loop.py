"""The trainer: model, input, update and bookkeeping sections, in that order."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from tensorboardX import SummaryWriter

from skipvision_jax import sharding
from skipvision_jax.config import validate_experiment
from skipvision_jax.data.pipeline import DataSpec, text_format
from skipvision_jax.experiment import RUN_TOKENIZER, build_model_config, model_image_size, with_data_settings
from skipvision_jax.train.checkpoint import Checkpointer
from skipvision_jax.train.restore import initial_params
from skipvision_jax.train.state import build_state_plan
from skipvision_jax.train.step import (
    make_eval_step,
    make_train_step,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class MetricsLog:
    """`metrics.jsonl` (one object per logged step) and TensorBoard events, written by process 0."""

    def __init__(self, workdir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._drop_entries_after(resume_step)
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _drop_entries_after(self, step: int) -> None:
        """On resume from an older checkpoint, lines past it would be logged twice."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


class StopOnSigterm:
    """Whether to save and exit (0) after a step, because of SIGTERM.

    One process: a flag set by our handler. Several: JAX's preemption sync
    manager (started by `jax.distributed.initialize`, it catches SIGTERM in
    any process) picks one step at which every process agrees to stop
    (`orbax.checkpoint.multihost.reached_preemption`), so all of them save the
    same step and none is left waiting in a collective."""

    def __init__(self):
        self.requested = False
        self.multihost = jax.process_count() > 1
        # Our handler would replace the sync manager's, which must see the signal.
        self.previous = None if self.multihost else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self.multihost:
            return ocp.multihost.reached_preemption(step)
        return self.requested

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def evaluate(eval_step, params, data: DataSpec, cfg, mesh, rows: tuple[int, int]) -> dict[str, float]:
    max_batches = None if cfg.train.eval_batches < 0 else cfg.train.eval_batches
    totals: dict[str, np.ndarray] = {}
    for batch in data.val_batches(cfg.train.batch_size, max_batches, rows):
        for key, value in eval_step(params, sharding.global_batch(batch, mesh, cfg.train.batch_size)).items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
    if not totals:
        return {}
    results = {
        "val_exact_match": float(totals["exact"] / max(totals["examples"], 1)),
        "val_token_accuracy": float(totals["correct_tokens"] / max(totals["tokens"], 1)),
        "val_loss": float(totals["loss_sum"] / max(totals["tokens"], 1)),
    }
    for kind, exact, count in zip(
        data.question_kinds, totals.get("exact_by_kind", []), totals.get("examples_by_kind", [])
    ):
        results[f"val_exact_match_{kind}"] = float(exact / max(count, 1))
    if data.chance_exact_match is not None:
        results["val_chance_exact_match"] = data.chance_exact_match
    return results


def describe_params(params, mesh) -> dict[str, int]:
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    on_device = sharding.per_device_bytes(params)
    log.info(
        "mesh %s: params %.2f MiB, %.2f MiB on the most loaded device (%.2fx smaller)",
        dict(mesh.shape),
        total / 2**20,
        on_device / 2**20,
        total / max(on_device, 1),
    )
    return {"param_bytes": total, "param_bytes_per_device": on_device}


def keep_run_files(cfg, workdir: str) -> None:
    """Writes what evaluation, serving and export read instead of the training
    data: the config with its derived settings (`config.json`) and a copy of
    the tokenizer (LLaVA-format runs). A resumed run keeps its tokenizer."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() != 0:
        return
    if cfg.data.kind == "llava":
        kept = os.path.join(workdir, RUN_TOKENIZER)
        with open(cfg.data.tokenizer, "rb") as f:
            given = f.read()
        if os.path.exists(kept):
            with open(kept, "rb") as f:
                if f.read() != given:
                    raise ValueError(f"data.tokenizer: {cfg.data.tokenizer} differs from the run's own {kept}")
        else:
            with open(kept, "wb") as f:
                f.write(given)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json(indent=2))


def train_and_evaluate(cfg, workdir: str) -> dict[str, float]:
    """Trains `cfg` in `workdir`, resuming from its newest good checkpoint.
    Returns the last logged metrics."""
    validate_experiment(cfg)
    # ---- input (what follows from the data fills the config before anything is written)
    text = text_format(cfg.data)
    cfg = with_data_settings(cfg, text)
    data = DataSpec(cfg.data, text, model_image_size(cfg))
    cfg.data.text_len = data.text_len
    if data.truncated_at_start:
        log.warning(
            "%d conversations are longer than data.text_len %d and are cut there",
            data.truncated_at_start,
            data.text_len,
        )
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ValueError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by train.grad_accum ({cfg.train.grad_accum})"
        )
    # ---- mesh
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh)
    rows = sharding.process_rows(mesh, cfg.train.batch_size)
    # ---- model
    model_cfg = build_model_config(cfg, text)
    model, optimizer, plan = build_state_plan(cfg, model_cfg, mesh, rules)
    keep_run_files(cfg, workdir)
    train_iter = data.train_iterator(cfg.train.batch_size, cfg.data.seed, rows)
    # ---- checkpoints and resume (onto this mesh, whichever mesh wrote them)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.train.keep_checkpoints)
    restored = checkpointer.restore_latest(plan.abstract)
    if restored is not None:
        state, data_state = restored
        train_iter.set_state(data_state)
        log.info("resumed from step %d", int(state.step))
    else:
        state = plan.create()
        state = state.replace(params=initial_params(cfg, state.params, plan.abstract.params, mesh, rules))
    start = int(state.step)
    param_info = describe_params(state.params, mesh)
    # ---- update
    train_step = jax.jit(
        make_train_step(model, optimizer, cfg.train.grad_accum),
        out_shardings=(plan.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(model, len(data.question_kinds)), out_shardings=sharding.replicated(mesh))
    metrics_log = MetricsLog(workdir, start)
    sigterm = StopOnSigterm()
    tokens_per_example = cfg.data.text_len + model_cfg.vision.num_features
    last: dict[str, float] = {}
    progress = tqdm.tqdm(
        range(start + 1, cfg.train.steps + 1),
        initial=start,
        total=cfg.train.steps,
        desc="train",
        disable=jax.process_index() != 0,
        mininterval=2.0,
    )
    window_start, window_steps = time.perf_counter(), 0
    run_start = window_start
    try:
        # `step` counts on the host: reading state.step would wait for the
        # device every step and stall asynchronous dispatch.
        for step in progress:
            with sharding.activate(mesh, rules):
                state, metrics = train_step(state, sharding.global_batch(next(train_iter), mesh, cfg.train.batch_size))
            window_steps += 1
            is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
            stop = sigterm.should_stop(step)  # read once: a signal arriving later waits for the next step
            is_save = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop
            if step % cfg.train.log_every == 0 or is_eval or is_save:
                loss = float(metrics["loss"])
                # NaN propagates into the parameters, so checking before every
                # save keeps each saved checkpoint good.
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at step {step}; the last good checkpoint (step {checkpointer.steps()[-1] if checkpointer.steps() else 'none'}) is kept"
                    )
                elapsed = time.perf_counter() - window_start
                values = {
                    "loss": loss,
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": window_steps * cfg.train.batch_size * tokens_per_example / elapsed,
                    # Training and evaluation since this process started (or resumed), compile included.
                    "elapsed_s": time.perf_counter() - run_start,
                }
                if is_eval:
                    with sharding.activate(mesh, rules):
                        values.update(evaluate(eval_step, state.params, data, cfg, mesh, rows))
                if data.skipped_records:
                    values["skipped_records"] = data.skipped_records
                if data.truncated_records:
                    values["truncated_records"] = data.truncated_records
                metrics_log.write(step, values)
                progress.set_postfix(
                    loss=f"{loss:.4f}",
                    tok_s=f"{values['tokens_per_s']:.0f}",
                    **({"val_em": f"{values['val_exact_match']:.3f}"} if "val_exact_match" in values else {}),
                )
                last = {"step": step, **values, **param_info}
                window_start, window_steps = time.perf_counter(), 0
            if is_save:
                checkpointer.save(step, state, train_iter.get_state())
            if stop:
                log.warning("SIGTERM: saved step %d, exiting", step)
                break
    finally:
        sigterm.restore()
        train_iter.close()  # stops its prefetch thread now, not at interpreter exit
        progress.close()
        metrics_log.close()
        checkpointer.close()
    return last
