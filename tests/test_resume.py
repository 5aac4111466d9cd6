"""A run killed at any moment resumes from its last checkpoint with the losses it would have had."""

import os
import signal
import subprocess

import pytest
from faults_helpers import command, resume_and_compare, uninterrupted, wait_for  # noqa: F401 (a fixture)

from tunelite.cli.main import main


@pytest.mark.parametrize("kill_after", ["step_10", "step_20"])
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, uninterrupted, kill_after):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for((out / kill_after).exists, proc, kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "step_36").exists(), "the run finished before the kill; the test proved nothing"
    resume_and_compare(out, uninterrupted)


def demo_run(out, *overrides: str) -> int | None:
    return main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", *overrides])


def one_epoch(out) -> None:
    """The demo's first epoch, its checkpoint in out/step_12."""
    assert demo_run(out, "epochs=1", "save_merged_model=False") in (0, None)


def resume_into_second_epoch(out, *overrides: str) -> int | None:
    return demo_run(out, "epochs=2", *overrides, "resume_from_checkpoint=True")


def test_checkpoint_with_missing_file_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    one_epoch(out)
    (out / "step_12" / "adapter" / "adapter_config.json").unlink()
    assert resume_into_second_epoch(out) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_truncated_checkpoint_file_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    one_epoch(out)
    weights = out / "step_12" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert resume_into_second_epoch(out) == 2
    assert "adapter_model.safetensors is 100 bytes" in capsys.readouterr().err


def test_resume_with_changed_batch_size_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    one_epoch(out)
    assert resume_into_second_epoch(out, "batch_size=4") == 2
    assert "batch_size: checkpoint 8, config 4" in capsys.readouterr().err
