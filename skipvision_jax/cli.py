"""Shared command-line plumbing for train.py and infer.py: configs from Python
files (ml_collections), and bad input as a one-line error with a non-zero exit."""

from __future__ import annotations

import logging
import sys
from typing import Callable, NoReturn

from absl import app, flags
from ml_collections import config_flags


def one_line(err: BaseException) -> str:
    return " ".join(str(err).replace("\\n", " ").split())


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def define_config_flag(default_path: str) -> None:
    """`--config path.py` plus `--config.a.b=value` overrides. ml_collections
    applies the overrides while defining the flag, so an unknown key fails here."""
    try:
        config_flags.DEFINE_config_file("config", default_path, "Experiment config file (Python, get_config()).", lock_config=True)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        fail(f"bad config override: {one_line(err)}", code=2)


def load_config():
    try:
        config = flags.FLAGS.config
        config.to_dict()  # forces the load, so a missing config file fails here
        return config
    except OSError as err:
        fail(f"cannot load --config: {one_line(err).split(' Attempted')[0]}", code=2)


def quiet_library_logs() -> None:
    # absl routes every library's INFO chatter (orbax logs each file it writes)
    # to the root logger: keep warnings from libraries, INFO from this project.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("skipvision_jax").setLevel(logging.INFO)


def run(main: Callable[[], None], expected_errors: tuple[type[BaseException], ...]) -> None:
    """app.run(main), with the expected errors printed as one line, exit 1."""

    def wrapped(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}", code=2)
        quiet_library_logs()
        try:
            main()
        except expected_errors as err:
            fail(one_line(err))

    app.run(wrapped, argv=dashes_to_underscores(sys.argv))


def dashes_to_underscores(argv: list[str]) -> list[str]:
    """Accepts `--kv-policy` for absl's `--kv_policy` (config overrides keep their dots)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("--config"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out
