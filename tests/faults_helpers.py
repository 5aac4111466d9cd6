"""Runs of the tiny LoRA demo for the resume and fault tests, and the faults they inject.

Configs can name any importable `_component_`, so a test's fault is a component of this module
(tests/ is on sys.path in pytest, and first on it when this file runs as a script). Run as a
script, `python tests/faults_helpers.py SECONDS ARGS...` is `tunelite ARGS...` with every
torch.save slowed to take SECONDS, so a test can kill a run in the middle of a checkpoint write.
"""

import io
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tunelite.checkpointing.atomic import TMP_PREFIX
from tunelite.checkpointing.state import checkpoint_folders
from tunelite.cli.main import main
from tunelite.modules.loss import LinearCrossEntropyLoss

# Dropout on, so the resumed run also needs the RNG state to match.
ARGS = ["epochs=3", "save_every_n_steps=5", "log_every_n_steps=1", "keep_last_n_checkpoints=null",
        "model.lora_dropout=0.1", "save_merged_model=False"]
TOTAL_STEPS = 36


def run_args(out: Path, *extra: str) -> list[str]:
    """`tunelite` arguments of the demo run into `out`, `extra` overriding ARGS."""
    return ["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", *ARGS, *extra]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tunelite.cli.main", *run_args(out, *extra)]


def slow_writes_command(seconds: float, out: Path, *extra: str) -> list[str]:
    return [sys.executable, __file__, str(seconds), *run_args(out, *extra)]


def metrics(out: Path) -> dict[int, dict[str, Any]]:
    """Step -> logged row over every metrics file of the folder, later runs overriding earlier
    ones; a line still being written is left out."""
    found: dict[int, dict[str, Any]] = {}
    for path in sorted((out / "logs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                row = json.loads(line)
                found[row["step"]] = row
    return found


def last_step(out: Path) -> int:
    """The newest step the run in `out` has logged (0 before the first)."""
    return max(metrics(out), default=0)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Polls until `condition` holds; fails if the run ends or the time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def resume_and_compare(out: Path, uninterrupted: dict[int, dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """Resumes the run in `out` from its newest checkpoint, in-process with `tunelite` arguments
    `argv` (by default the run's own with resume_from_checkpoint=True), then checks that the steps
    after that checkpoint have, bit for bit, the uninterrupted run's losses, and that no leftover
    of an unfinished write survived. Returns the steps lost: those done before the interruption
    but after the checkpoint."""
    folders = checkpoint_folders(out)
    resumed_from = int(folders[-1].name.split("_")[1]) if folders else 0
    lost = last_step(out) - resumed_from
    assert main(list(argv or run_args(out, "resume_from_checkpoint=True"))) == 0
    after = metrics(out)
    assert sorted(after) == list(range(1, TOTAL_STEPS + 1))
    for step in range(resumed_from + 1, TOTAL_STEPS + 1):
        ours, theirs = after[step]["loss"], uninterrupted[step]["loss"]
        assert ours == theirs, f"step {step}: {ours} != {theirs}"
    assert not list(out.glob(f"{TMP_PREFIX}*")), "leftovers of an unfinished write were not cleaned up"
    return lost


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The logged rows of the run never interrupted; made once per session (the modules that use
    it share the folder under pytest's base temporary directory)."""
    out = tmp_path_factory.getbasetemp() / "uninterrupted"
    if not (out / f"step_{TOTAL_STEPS}").is_dir():
        subprocess.run(command(out), check=True, capture_output=True)
    return metrics(out)


class NonFiniteAtSteps(LinearCrossEntropyLoss):
    """The demo's loss, made non-finite at chosen calls (the steps, with one micro-batch each):
    at `nan_loss_at` the loss is NaN; at `nan_gradient_at` it is the true, finite loss, but
    every gradient is NaN, as when backward overflows."""

    def __init__(self, nan_loss_at: Sequence[int] = (), nan_gradient_at: Sequence[int] = (), num_chunks: int = 8) -> None:
        super().__init__(num_chunks)
        self.nan_loss_at, self.nan_gradient_at = set(nan_loss_at), set(nan_gradient_at)
        self.calls = 0

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        loss = super().forward(hidden, labels, output)
        self.calls += 1
        if self.calls in self.nan_loss_at:
            return loss * float("nan")
        if self.calls in self.nan_gradient_at:
            # sqrt's slope at 0 is infinite: this adds 0 to the loss and 0 * inf = NaN to the gradients.
            return loss + 0 * torch.sqrt(0 * hidden.sum())
        return loss


def slow_torch_save(seconds: float) -> Callable[..., None]:
    """torch.save, writing its bytes in ten pieces over `seconds`, so a file is half-written for a while."""
    real_save = torch.save

    def save(obj: Any, path: str | Path, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        piece = -(-len(data) // 10)
        with open(path, "wb") as f:
            for start in range(0, len(data), piece):
                f.write(data[start:start + piece])
                f.flush()
                time.sleep(seconds / 10)

    return save


if __name__ == "__main__":
    torch.save = slow_torch_save(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
