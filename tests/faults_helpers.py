"""Runs of the tiny LoRA demo for the resume and fault tests, and the faults they inject.

Configs can name any importable `_component_`, so a test's fault is a component of this module
(tests/ is on sys.path in pytest, and first on it when this file runs as a script): FaultyLoss
makes chosen steps' losses NaN or larger, and pauses a run inside a chosen step until the test
releases it. Run as a script, `python tests/faults_helpers.py ARGS...` is `tunelite ARGS...`;
with `--pause-write GATE STEP` first, the checkpoint write of step_STEP stops half-written until
the test releases it.
Tests wait on these points (files in GATE) and on the run's own output, never on the clock, so
they pass however loaded the machine is.
"""

import io
import json
import os
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
FAULTY_LOSS = "loss._component_=faults_helpers.FaultyLoss"
# A run may build this module's components only because its config trusts the module.
TRUST_HELPERS = "+trusted_components=[faults_helpers]"


def run_args(out: Path, *extra: str) -> list[str]:
    """`tunelite` arguments of the demo run into `out`, `extra` overriding ARGS. The run trusts this
    module, so a config may build its faults as components."""
    return ["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}",
            TRUST_HELPERS, *ARGS, *extra]


def command(out: Path, *extra: str) -> list[str]:
    """The demo run as a process (through this file, so that its components can be named)."""
    return [sys.executable, __file__, *run_args(out, *extra)]


def paused_write_command(gate: Path, step: int, out: Path, *extra: str) -> list[str]:
    """The demo run as a process whose checkpoint write of step_`step` stops half-written until
    release(gate, "write")."""
    return [sys.executable, __file__, "--pause-write", str(gate), str(step), *run_args(out, *extra)]


def pause_args(gate: Path, *steps: int) -> list[str]:
    """Overrides that pause the demo run inside each of `steps` (its loss computed, no backward
    yet) until release(gate, step)."""
    return [FAULTY_LOSS, f"+loss.pause_at=[{','.join(map(str, steps))}]", f"+loss.gate={gate}"]


def wait_paused(gate: Path, name: int | str, proc: subprocess.Popen) -> None:
    """Waits until the run `proc` reaches the pause `name` (a step, or "write")."""
    wait_for((gate / f"paused-{name}").exists, proc, f"the pause at {name}")


def release(gate: Path, name: int | str) -> None:
    (gate / f"release-{name}").touch()


def _wait_for_release(gate: Path, name: int | str) -> None:
    """Where a run paused by a test waits: it says so, then waits until the test releases it, or
    ends if the test's process is gone (nobody would release it)."""
    parent = os.getppid()
    (gate / f"paused-{name}").touch()
    while not (gate / f"release-{name}").exists():
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.01)


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


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Polls until `condition` holds; fails if the run ends first. No time limit: what a test
    waits for is a point the run reaches (a pause, a file), however slowly the machine runs."""
    while not condition():
        assert proc.poll() is None, f"the run ended (exit code {proc.returncode}) before {what}"
        time.sleep(0.01)


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
        subprocess.run(command(out, "+overwrite_output_dir=True"), check=True, capture_output=True)
    return metrics(out)


class FaultyLoss(LinearCrossEntropyLoss):
    """The demo's loss with faults at chosen calls (the steps, with one micro-batch each; a run
    resumed after step N passes first_call=N+1): at `nan_loss_at` the loss is NaN; at
    `nan_gradient_at` it is the true, finite loss, but every gradient is NaN, as when backward
    overflows; at `scale_at` it is multiplied by the matching `scale_by`, as a diverging run's
    loss grows; at `pause_at` the run waits, its loss computed, until the test releases it."""

    def __init__(self, nan_loss_at: Sequence[int] = (), nan_gradient_at: Sequence[int] = (),
                 scale_at: Sequence[int] = (), scale_by: Sequence[float] = (), pause_at: Sequence[int] = (),
                 gate: str = "", first_call: int = 1, num_chunks: int = 8) -> None:
        super().__init__(num_chunks)
        self.nan_loss_at, self.nan_gradient_at, self.pause_at = set(nan_loss_at), set(nan_gradient_at), set(pause_at)
        self.scale = dict(zip(scale_at, scale_by, strict=True))
        self.gate = Path(gate)
        self.calls = first_call - 1

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, output: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        loss = super().forward(hidden, labels, output)
        self.calls += 1
        if self.calls in self.pause_at:
            _wait_for_release(self.gate, self.calls)
        if self.calls in self.nan_loss_at:
            return loss * float("nan")
        if self.calls in self.nan_gradient_at:
            # sqrt's slope at 0 is infinite: this adds 0 to the loss and 0 * inf = NaN to the gradients.
            return loss + 0 * torch.sqrt(0 * hidden.sum())
        return loss * self.scale.get(self.calls, 1.0)


def paused_torch_save(gate: Path, step: int) -> Callable[..., None]:
    """torch.save, stopping half-way through its file in step_`step`'s checkpoint until
    release(gate, "write"): a test acts while the write is certainly unfinished."""
    real_save = torch.save

    def save(obj: Any, path: str | Path, *args: Any, **kwargs: Any) -> None:
        if not Path(path).parent.name.startswith(f"{TMP_PREFIX}step_{step}-"):
            return real_save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            _wait_for_release(gate, "write")
            f.write(data[len(data) // 2:])

    return save


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--pause-write":
        torch.save = paused_torch_save(Path(args[1]), int(args[2]))
        args = args[3:]
    sys.exit(main(args))
