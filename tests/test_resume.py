"""A run killed at any moment resumes from its last checkpoint with the losses it would have had."""

import hashlib
import json
import math
import os
import signal
import subprocess

import pytest
import torch
from faults_helpers import (  # noqa: F401 (uninterrupted: a fixture)
    command,
    metrics,
    pause_args,
    resume_and_compare,
    uninterrupted,
    wait_paused,
)

from tunelite.checkpointing.atomic import MANIFEST, verify_folder
from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing.loading import restore_weights
from tunelite.checkpointing.peft import load_peft_adapter
from tunelite.checkpointing.state import checkpoint_folders
from tunelite.cli.main import main
from tunelite.errors import CheckpointError
from tunelite.generation.loading import load_generation_model


@pytest.mark.parametrize("kill_after", [10, 20])
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, uninterrupted, kill_after):
    out, gate = tmp_path / "run", tmp_path
    proc = subprocess.Popen(command(out, *pause_args(gate, kill_after + 1)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_paused(gate, kill_after + 1, proc)  # step_{kill_after} written, the next step under way
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / f"step_{kill_after}").is_dir()
    assert resume_and_compare(out, uninterrupted) == 0


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


# --- checksums: a file changed after tunelite wrote it is refused, never loaded or re-saved ------


def flip_a_bit(path) -> None:
    """Changes one float inside the file (its last byte's lowest bit), the length kept."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_manifest_holds_the_sha256_of_every_file(tmp_path):
    out = tmp_path / "run"
    assert demo_run(out, "epochs=1", "max_steps_per_epoch=2", "save_merged_model=True") == 0
    folder = out / "step_2"
    files = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(files) == on_disk
    for name, entry in files.items():
        content = (folder / name).read_bytes()
        assert entry == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}, name


def test_a_changed_float_in_the_adapter_is_refused_on_resume_and_never_resaved(tmp_path, capsys):
    out = tmp_path / "run"
    one_epoch(out)
    weights = out / "step_12" / "adapter" / "adapter_model.safetensors"
    flip_a_bit(weights)
    assert resume_into_second_epoch(out) == 2
    message = capsys.readouterr().err
    assert f"{weights} does not match its sha256 in {out / 'step_12' / MANIFEST}" in message
    assert "resume from an earlier step_* folder" in message
    assert checkpoint_folders(out) == [out / "step_12"], "the altered adapter was trained on and saved again"


def test_loading_a_changed_file_of_a_folder_tunelite_wrote_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    assert demo_run(out, "epochs=1", "max_steps_per_epoch=2", "save_merged_model=True") == 0
    adapter, merged = out / "step_2" / "adapter", out / "step_2" / "model"
    flip_a_bit(adapter / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors does not match its sha256"):
        load_peft_adapter(adapter)
    flip_a_bit(merged / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        load_generation_model(HFCheckpointer(str(merged)), None, torch.device("cpu"), torch.float32)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        restore_weights(torch.nn.Linear(1, 1), merged)


# --- resumed with changed settings: applied and said, or refused naming the key -----------------


def test_resume_with_a_changed_learning_rate_and_optimizer_settings_applies_them_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    one_epoch(out)
    capsys.readouterr()
    assert resume_into_second_epoch(out, "optimizer.lr=3e-4", "optimizer.weight_decay=0.1",
                                    "log_every_n_steps=1") == 0
    printed = capsys.readouterr().out
    for change in ("optimizer.lr: 0.003 -> 0.0003", "optimizer.weight_decay: 0.0 -> 0.1", "epochs: 1 -> 2",
                   "log_every_n_steps: 10 -> 1"):
        assert change in printed
    # The cosine schedule (5 warm-up steps) now spans 24 steps; a row's lr is the one for the next step.
    factor = 0.5 * (1 + math.cos(math.pi * (13 - 5) / (24 - 5)))
    assert metrics(out)[13]["lr"] == pytest.approx(3e-4 * factor, rel=1e-6)


def test_resume_with_another_optimizer_is_refused_naming_the_key(tmp_path, capsys):
    out = tmp_path / "run"
    one_epoch(out)
    assert resume_into_second_epoch(out, "optimizer._component_=torch.optim.SGD") == 2
    assert "optimizer._component_: checkpoint 'torch.optim.AdamW', config 'torch.optim.SGD'" in capsys.readouterr().err


def test_resume_with_a_changed_max_steps_per_epoch_continues_to_the_new_total(tmp_path, capsys):
    out = tmp_path / "run"
    assert demo_run(out, "epochs=1", "max_steps_per_epoch=4", "save_merged_model=False") == 0
    capsys.readouterr()
    assert demo_run(out, "epochs=1", "max_steps_per_epoch=6", "save_merged_model=False", "log_every_n_steps=1",
                    "resume_from_checkpoint=True") == 0
    assert "max_steps_per_epoch: 4 -> 6" in capsys.readouterr().out
    assert sorted(metrics(out)) == [4, 5, 6]  # step 4 logged by the first run (the last step), 5 and 6 by this one
    assert checkpoint_folders(out)[-1] == out / "step_6"


def test_resume_from_the_final_step_with_save_merged_model_writes_the_merged_folder_it_names(tmp_path, capsys):
    out = tmp_path / "run"
    assert demo_run(out, "epochs=1", "max_steps_per_epoch=2", "save_merged_model=False") == 0
    capsys.readouterr()
    assert demo_run(out, "epochs=1", "max_steps_per_epoch=2", "save_merged_model=True",
                    "resume_from_checkpoint=True") == 0
    final = out / "step_2"
    assert f"done: {final / 'adapter'} (peft layout), {final / 'model'} (merged, HF layout)" in capsys.readouterr().out
    verify_folder(final)
    assert (final / "model" / "config.json").is_file()


def test_resume_from_the_final_step_into_another_folder_writes_the_checkpoint_it_names(tmp_path, capsys):
    out, other = tmp_path / "run", tmp_path / "other"
    assert demo_run(out, "epochs=1", "max_steps_per_epoch=2", "save_merged_model=False") == 0
    capsys.readouterr()
    assert demo_run(other, "epochs=1", "max_steps_per_epoch=2", "save_merged_model=False",
                    f"resume_from_checkpoint={out / 'step_2'}") == 0
    assert f"done: {other / 'step_2' / 'adapter'} (peft layout)" in capsys.readouterr().out
    verify_folder(other / "step_2")
