"""SIGTERM and SIGINT as a request to stop after the step in progress, with a checkpoint."""

import signal
import sys
import threading
from typing import Any

from tqdm import tqdm

from tunelite.runtime.command_line import resume_command
from tunelite.runtime.ranks import max_over_ranks


class StopRequest:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) taken as a request to stop after the
    step in progress, with a checkpoint, instead of an end that loses every step since the last one.

    Handlers are installed only while entered, and only in the main thread (the one Python delivers
    signals to). The first signal puts back the system's default handlers, so a second one ends
    the process at once, even inside a C call that never returns to Python (a hung collective);
    all it can cut short is a checkpoint's temporary folder, which the next resume deletes."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python, which Python cannot put back.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for other in self.SIGNALS:
            signal.signal(other, signal.SIG_DFL)
        # A plain print: the handler may run while the progress bar holds its lock.
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint; "
              "send it again to stop at once", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether a signal asked to stop, agreed by every rank of a distributed run: a rank that
        stopped alone would leave the others waiting in a collective."""
        self.signum = max_over_ranks(self.signum or 0) or None
        return self.signum is not None

    def stopped(self, step: int, total_steps: int, checkpoint: str) -> SystemExit:
        """What ends the run once its checkpoint is written: a line saying where it stopped and the
        command that continues it, and the exit code a shell gives for the signal, 128 + its number."""
        tqdm.write(f"{signal.Signals(self.signum).name}: stopped after step {step} of {total_steps}, checkpoint "
                   f"{checkpoint}; resume with:\n  {resume_command()}", file=sys.stderr)
        return SystemExit(128 + self.signum)
