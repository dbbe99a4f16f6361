"""Errors as the command lines and answer files print them."""


def one_line(err: BaseException) -> str:
    """An error's message on one line (escaped and real newlines become spaces)."""
    return " ".join(str(err).replace("\\n", " ").split())


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""
