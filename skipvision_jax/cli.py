"""Shared command-line plumbing for train.py, infer.py, eval.py and serve.py: configs from Python
files (ml_collections), and bad input as a one-line error with a non-zero exit."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags
from ml_collections import config_flags

from skipvision_jax import compilation, sharding
from skipvision_jax.config import FLOAT_DTYPES
from skipvision_jax.errors import one_line
from skipvision_jax.kvcache import KVPolicy
from skipvision_jax.presses import press_class, press_named


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def define_config_flag(default_path: str) -> None:
    """`--config path.py` plus `--config.a.b=value` overrides. ml_collections
    applies the overrides while defining the flag, so an unknown key fails here."""
    try:
        config_flags.DEFINE_config_file(
            "config", default_path, "Experiment config file (Python, get_config()).", lock_config=True
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        fail(f"bad config override: {one_line(err)}", code=2)


def load_config():
    try:
        config = flags.FLAGS.config
        config.to_dict()  # forces the load, so a missing config file fails here
        return config
    except OSError as err:
        path = flags.FLAGS["config"].config_filename
        if path and not os.path.exists(path):
            fail(f"--config: no such file {path}", code=2)
        fail(f"cannot load --config {path}: {one_line(err).split(' Attempted')[0]}", code=2)


def parse_mesh(text: str) -> dict[str, int]:
    """ "data,fsdp,tensor" sizes, e.g. "1,1,-1"."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != len(sharding.MESH_AXES):
        raise ValueError(
            f"--mesh: expected {len(sharding.MESH_AXES)} comma-separated sizes (data,fsdp,tensor), got {text!r}"
        )
    return dict(zip(sharding.MESH_AXES, sizes))


def directory_name(path: str) -> str:
    """ "runs/default/" -> "default"."""
    return os.path.basename(os.path.normpath(path))


def quiet_library_logs() -> None:
    # absl routes every library's INFO chatter (orbax logs each file it writes)
    # to the root logger: keep warnings from libraries, INFO from this project.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("skipvision_jax").setLevel(logging.INFO)


flags.DEFINE_string(
    "compilation_cache",
    compilation.default_cache_dir(),
    f"JAX's persistent compilation cache: programs compiled once are read back on the next run; '' turns it off"
    f" (default: ${compilation.CACHE_ENV}, else the user's cache directory).",
)


def define_distributed_flags() -> None:
    """Multi-host start-up (see README, "Several hosts")."""
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for jax.distributed.initialize.")
    flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() with its cluster auto-detection (TPU pods, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).",
    )


def define_model_flags() -> None:
    """Which model a command answers with (infer.py, eval.py, serve.py)."""
    flags.DEFINE_string("checkpoint", None, "A train.py workdir.")
    flags.DEFINE_string(
        "hf_checkpoint", None, "A Hugging Face LlavaForConditionalGeneration directory (weights, tokenizer, processor)."
    )
    flags.DEFINE_integer(
        "visual_kept", -1, "With --hf-checkpoint: visual tokens that stay in the cache under skip_vision (-1: all)."
    )
    flags.DEFINE_string("mesh", "1,1,-1", "Devices on the data,fsdp,tensor mesh axes (-1: the rest).")
    flags.DEFINE_string(
        "dtype",
        "auto",
        "auto | float32 | bfloat16: what the weights are held and computed in (auto: the checkpoint's own, as"
        " transformers' dtype='auto'; a train.py run: its own param_dtype and compute dtype).",
    )
    flags.DEFINE_string(
        "conv_mode",
        None,
        "Prompt in this template (plain | vicuna_v1 | llama3 | llama3_plain) instead of the run's, as LLaVA's eval"
        " scripts' --conv-mode; with --hf-checkpoint, instead of the processor's chat template.",
    )


def check_model_flags() -> dict[str, int]:
    """ValueError unless the model flags name one model on a well-formed mesh; the mesh's sizes."""
    f = flags.FLAGS
    if (f.checkpoint is None) == (f.hf_checkpoint is None):
        raise ValueError("give exactly one of --checkpoint (a train.py workdir) and --hf-checkpoint")
    return parse_mesh(f.mesh)


def load_model_from_flags():
    """The model the model flags name, on their mesh (an `inference.LoadedModel`)."""
    from skipvision_jax.inference import load_hf, load_trained

    mesh = check_model_flags()
    f = flags.FLAGS
    if f.dtype not in ("auto", *FLOAT_DTYPES):
        raise ValueError(f"--dtype: unknown {f.dtype!r}, expected auto or one of {FLOAT_DTYPES}")
    if f.checkpoint:
        return load_trained(f.checkpoint, mesh, f.conv_mode, f.dtype)
    return load_hf(f.hf_checkpoint, mesh, f.visual_kept, f.conv_mode, f.dtype)


def define_kv_flags() -> None:
    """The KV policy's settings (the policy's name is each command's own flag)."""
    flags.DEFINE_integer(
        "kv_budget", None, "KV slots per layer: a fixed buffer; h2o, streaming and tova evict while decoding."
    )
    flags.DEFINE_float(
        "kv_compression",
        None,
        "kvpress's compression ratio R: each prompt keeps int(L * (1 - R)) keys per KV head, decoding appends.",
    )
    for name, help_text in KNOB_FLAGS.items():
        flags.DEFINE_string(name, None, help_text)


# The presses' knobs as flags; each press takes those it has (`presses.py`,
# defaults there), and naming one its press lacks is an error.
KNOB_FLAGS = {
    "sink_tokens": "Attention sinks kept by streaming, h2o and expected_attention.",
    "recent_window": "Recent tokens kept by h2o.",
    "obs_window": "SnapKV's and PyramidKV's observation window.",
    "pool_kernel": "SnapKV's and PyramidKV's average pooling of the window's scores (odd).",
    "pyramid_beta": "PyramidKV's steepness.",
    "future_positions": "ExpectedAttention's future queries averaged over.",
    "use_covariance": "ExpectedAttention: whether the queries' covariance counts (true | false).",
    "use_vnorm": "ExpectedAttention: whether scores are scaled by the values' norms (true | false).",
    "epsilon": "ExpectedAttention: added to the scores before the value-norm scaling.",
}


def _knob_value(name: str, text: str, kind: type):
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--{name}: expected true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {kind.__name__}, got {text!r}") from None


def kv_policies_from_flags(names: Sequence[str]) -> list[KVPolicy]:
    """One policy per name, from the KV flags. Run together (eval.py's `all`,
    infer.py's --compare_policies), `full` and `skip_vision` take neither the
    budget nor the ratio (those size the pruning policies), and each press
    takes the knob flags it has. Alone, a budget, ratio or knob its press
    cannot take is an error."""
    f = flags.FLAGS
    alone = len(names) == 1
    given = {name: getattr(f, name) for name in KNOB_FLAGS if getattr(f, name) is not None}
    policies = []
    for name in names:
        types = {field.name: field.type for field in dataclasses.fields(press_class(name))}
        knobs = {  # alone, a knob its press lacks goes on to press_named, which says so
            knob: _knob_value(knob, text, {"int": int, "float": float, "bool": bool}[types[knob]])
            if knob in types
            else text
            for knob, text in given.items()
            if alone or knob in types
        }
        press = press_named(name, **knobs)
        sized = alone or not press.fixed
        policies.append(KVPolicy(press, f.kv_budget if sized else None, f.kv_compression if sized else None))
    return policies


def run(main: Callable[[], None], expected_errors: tuple[type[BaseException], ...]) -> None:
    """app.run(main), with the expected errors printed as one line, exit 1.
    Joins the multi-host job first when the distributed flags ask for it."""

    def wrapped(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}", code=2)
        quiet_library_logs()
        compilation.enable_persistent_cache(flags.FLAGS.compilation_cache)
        try:
            f = flags.FLAGS
            if "coordinator" in f:  # commands that run on several hosts define the distributed flags
                sharding.initialize_distributed(f.coordinator, f.num_processes, f.process_id, f.distributed)
            main()
        except expected_errors as err:
            fail(one_line(err))

    try:
        app.run(wrapped, argv=dashes_to_underscores(sys.argv), flags_parser=parse_flags)
    except SyntaxError as err:  # a --config file that is not Python, raised while absl parses the flags
        fail(f"--config: {err.filename} line {err.lineno}: {err.msg}", code=2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with an error raised inside a --config file
    (ml_collections quotes its whole traceback) cut to its last line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        fail(f"{lines[0]} {lines[-1]}" if "Traceback" in str(err) else one_line(err), code=2)


def dashes_to_underscores(argv: list[str]) -> list[str]:
    """Accepts `--kv-policy` for absl's `--kv_policy` (config overrides keep their dots)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("--config"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out
