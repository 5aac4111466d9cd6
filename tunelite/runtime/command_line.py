"""The user's own `tunelite run ...` command line, recorded for the recipe it starts.

In the recipe's process sys.argv holds only the recipe script's arguments (and under torchrun,
each worker's), so `tunelite run` records what the user typed in an environment variable, and a
stopped run prints it back with resume_from_checkpoint=True as the command that continues it.
"""

import contextlib
import json
import os
import shlex
import sys
from typing import Iterator

COMMAND_LINE_ENV = "TUNELITE_COMMAND_LINE"


@contextlib.contextmanager
def recorded_command_line(command_line: list[str]) -> Iterator[None]:
    """Sets COMMAND_LINE_ENV, for the recipe run in-process or the processes torchrun starts,
    and puts back what was there before."""
    before = os.environ.get(COMMAND_LINE_ENV)
    os.environ[COMMAND_LINE_ENV] = json.dumps(command_line)
    try:
        yield
    finally:
        if before is None:
            del os.environ[COMMAND_LINE_ENV]
        else:
            os.environ[COMMAND_LINE_ENV] = before


def resume_command() -> str:
    """The command line that continues this run from its newest checkpoint: the user's own, as
    `tunelite run` recorded it, else this process's, with any resume_from_checkpoint override
    replaced by resume_from_checkpoint=True."""
    recorded = os.environ.get(COMMAND_LINE_ENV)
    argv = json.loads(recorded) if recorded else [sys.executable, *sys.argv]
    kept = [arg for arg in argv if arg.lstrip("+~").partition("=")[0] != "resume_from_checkpoint"]
    # A config without the key got it from a `+` override, and needs one again.
    added = any(arg.startswith("+resume_from_checkpoint=") for arg in argv)
    return shlex.join([*kept, f"{'+' if added else ''}resume_from_checkpoint=True"])
