"""A run killed at any moment resumes from its last checkpoint with the losses it would have had."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelite.checkpointing.state import checkpoint_folders
from tunelite.cli.main import main

# Dropout on, so the resumed run also needs the RNG state to match.
ARGS = ["epochs=3", "save_every_n_steps=5", "log_every_n_steps=1", "keep_last_n_checkpoints=null",
        "model.lora_dropout=0.1", "save_merged_model=False"]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tunelite.cli.main", "run", "lora_finetune_single_device", "--config",
            "tiny/lora_cpu", f"output_dir={out}", *ARGS, *extra]


def losses(out: Path) -> dict[int, float]:
    """Step -> loss over every metrics file of the folder, later runs overriding earlier ones."""
    found: dict[int, float] = {}
    for path in sorted((out / "logs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            found[row["step"]] = row["loss"]
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(command(out), check=True, capture_output=True)
    return losses(out)


@pytest.mark.parametrize("kill_after", ["step_10", "step_20"])
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, uninterrupted, kill_after):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / kill_after).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "step_36").exists(), "the run finished before the kill; the test proved nothing"
    resumed_from = int(checkpoint_folders(out)[-1].name.split("_")[1])

    subprocess.run(command(out, "resume_from_checkpoint=True"), check=True, capture_output=True)
    after = losses(out)
    assert sorted(after) == sorted(uninterrupted) == list(range(1, 37))
    for step in range(resumed_from + 1, 37):
        assert after[step] == uninterrupted[step], f"step {step}: {after[step]} != {uninterrupted[step]}"
    assert not list(out.glob(".tmp-*")), "leftovers of the killed write were not cleaned up"


def test_checkpoint_with_missing_file_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=1",
                 "save_merged_model=False"]) in (0, None)
    (out / "step_12" / "adapter" / "adapter_config.json").unlink()
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=2",
                 "resume_from_checkpoint=True"]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_truncated_checkpoint_file_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=1",
                 "save_merged_model=False"]) in (0, None)
    weights = out / "step_12" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=2",
                 "resume_from_checkpoint=True"]) == 2
    assert "adapter_model.safetensors is 100 bytes" in capsys.readouterr().err


def test_resume_with_changed_batch_size_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=1",
                 "save_merged_model=False"]) in (0, None)
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=2",
                 "batch_size=4", "resume_from_checkpoint=True"]) == 2
    assert "batch_size: checkpoint 8, config 4" in capsys.readouterr().err
