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
