"""Runs that fail, whatever the fault, lose at most the steps since their last checkpoint, never
load anything half-written, say what went wrong, and resume to the losses, bit for bit, of the
run that never failed (`uninterrupted`: the tiny LoRA demo, 36 steps, dropout on, a checkpoint
every 5 steps)."""

import errno
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from faults_helpers import (  # noqa: F401 (uninterrupted: a fixture)
    FAULTY_LOSS,
    TRUST_HELPERS,
    command,
    last_step,
    metrics,
    pause_args,
    paused_write_command,
    release,
    resume_and_compare,
    run_args,
    uninterrupted,
    wait_paused,
)
from omegaconf import OmegaConf
from safetensors import SafetensorError

from tunelite.checkpointing import peft
from tunelite.checkpointing.atomic import TMP_PREFIX, folder_bytes, verify_folder
from tunelite.checkpointing.state import checkpoint_folders
from tunelite.cli.main import main
from tunelite.runtime.command_line import COMMAND_LINE_ENV, resume_command
from tunelite.checkpointing.hf import load_hf_state_dict
from tunelite.config import asset_path, instantiate, load_config, resolve_config_path
from tunelite.data.sampler import ResumableSampler

NAN_LOSS = (FAULTY_LOSS,)


def leftovers(out: Path) -> list[Path]:
    return list(out.glob(f"{TMP_PREFIX}*"))


def samples_of_step(step: int) -> list[int]:
    """The dataset indices the demo trains on at `step` (8 per batch, 12 steps an epoch), from the
    sampler's definition: each epoch's order follows from the seed and the epoch alone."""
    cfg = load_config(resolve_config_path("tiny/lora_cpu"), [])
    OmegaConf.resolve(cfg)
    dataset = instantiate(cfg.dataset, instantiate(cfg.tokenizer))
    epoch, position = divmod(step - 1, 12)
    return ResumableSampler(len(dataset), shuffle=True, seed=0).indices(epoch)[position * 8:(position + 1) * 8]


def step_named(step: int) -> str:
    return f"step {step} (dataset samples {', '.join(map(str, samples_of_step(step)))})"


# --- killed: SIGKILL -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_loses_only_the_steps_since_the_last_checkpoint(tmp_path, uninterrupted, seed):
    kill_after = random.Random(seed).randint(6, 30)  # past the first checkpoint, well before the end
    out, gate = tmp_path / "run", tmp_path
    proc = subprocess.Popen(command(out, *pause_args(gate, kill_after + 1)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_paused(gate, kill_after + 1, proc)  # inside step kill_after + 1: its forward done, no update yet
    proc.kill()
    proc.wait()
    assert last_step(out) == kill_after
    assert resume_and_compare(out, uninterrupted) <= 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_during_a_checkpoint_write_resumes_from_the_one_before_it(tmp_path, uninterrupted, seed):
    step = random.Random(seed).choice([10, 20, 30])  # checkpoints at multiples of 5 and 12: these follow one 5 steps before
    out, gate = tmp_path / "run", tmp_path
    # keep_last_n_checkpoints=1: the previous checkpoint must still be there while the next is written.
    proc = subprocess.Popen(paused_write_command(gate, step, out, "keep_last_n_checkpoints=1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_paused(gate, "write", proc)  # recipe_state.pt of step_{step} half-written
    proc.kill()
    proc.wait()
    assert any(out.glob(f"{TMP_PREFIX}step_{step}-*")), "the paused write left no temporary folder"
    assert [folder.name for folder in checkpoint_folders(out)] == [f"step_{step - 5}"]
    verify_folder(out / f"step_{step - 5}")
    assert resume_and_compare(out, uninterrupted) == 5


# --- stopped: SIGTERM, SIGINT --------------------------------------------------------------------


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_prints_the_command_that_resumes(tmp_path, uninterrupted):
    out, gate, stderr = tmp_path / "run", tmp_path, tmp_path / "stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command(out, *pause_args(gate, 8)), stdout=subprocess.DEVNULL, stderr=err)
        wait_paused(gate, 8, proc)
        proc.send_signal(signal.SIGTERM)  # handled while step 8 is paused: the run stops after it
        release(gate, 8)
        assert proc.wait() == 128 + signal.SIGTERM
    assert last_step(out) == 8
    assert checkpoint_folders(out)[-1] == out / "step_8"
    verify_folder(out / "step_8")
    printed = re.search(r"SIGTERM: stopped after step (\d+) of 36, checkpoint (\S+); resume with:\n  (.+)\n",
                        stderr.read_text())
    assert printed, stderr.read_text()[-2000:]
    assert (int(printed[1]), printed[2]) == (8, str(out / "step_8"))
    resume = shlex.split(printed[3])
    assert resume == ["tunelite", *run_args(out, *pause_args(gate, 8), "resume_from_checkpoint=True")]
    # The printed command, less the test's pause (the resumed run would wait at step 8 again otherwise).
    assert resume_and_compare(out, uninterrupted, run_args(out, "resume_from_checkpoint=True")) == 0


def test_the_resume_command_is_the_users_own_with_any_resume_override_replaced(monkeypatch):
    monkeypatch.setenv(COMMAND_LINE_ENV, json.dumps(
        ["tunelite", "run", "my_recipe.py", "--config", "my.yaml", "+resume_from_checkpoint=out/step_5", "lr=1e-4"]))
    assert resume_command() == "tunelite run my_recipe.py --config my.yaml lr=1e-4 +resume_from_checkpoint=True"
    # Run as `python recipe.py ...`, without the CLI: this process's own command line.
    monkeypatch.delenv(COMMAND_LINE_ENV)
    monkeypatch.setattr(sys, "argv", ["recipe.py", "--config", "my.yaml", "resume_from_checkpoint=False"])
    assert resume_command() == shlex.join([sys.executable, "recipe.py", "--config", "my.yaml",
                                           "resume_from_checkpoint=True"])


def test_a_second_sigint_ends_the_run_at_once(tmp_path, uninterrupted):
    out, gate, stderr = tmp_path / "run", tmp_path, tmp_path / "stderr"
    with open(stderr, "w") as err:
        # Checkpoints at epoch ends only, so the first SIGINT's stop has one to write: step_3's, which
        # stays half-written until released, and is never released.
        proc = subprocess.Popen(paused_write_command(gate, 3, out, "save_every_n_steps=null", *pause_args(gate, 3)),
                                stdout=subprocess.DEVNULL, stderr=err)
        wait_paused(gate, 3, proc)
        proc.send_signal(signal.SIGINT)
        release(gate, 3)
        wait_paused(gate, "write", proc)
        assert "SIGINT: stopping after this step" in stderr.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait() == -signal.SIGINT, "the second SIGINT did not end the run by the signal"
    assert checkpoint_folders(out) == [], "the checkpoint write the second SIGINT cut short was completed"
    resume_and_compare(out, uninterrupted)


# --- non-finite loss or gradient -----------------------------------------------------------------


def test_a_nonfinite_loss_stops_the_run_naming_step_and_samples_without_checkpointing(
    tmp_path, uninterrupted, capsys
):
    out = tmp_path / "run"
    assert main(run_args(out, *NAN_LOSS, "+loss.nan_loss_at=[7]")) == 2
    message = capsys.readouterr().err
    assert f"{step_named(7)}: the loss is nan, the gradient norm nan; the optimizer did not step" in message
    assert f"The newest complete checkpoint is {out / 'step_5'}" in message
    assert last_step(out) == 6
    assert checkpoint_folders(out) == [out / "step_5"]
    assert resume_and_compare(out, uninterrupted) == 1


def test_skip_nonfinite_steps_skips_that_many_while_data_and_schedule_move_on_then_stops(
    tmp_path, uninterrupted, capsys
):
    out = tmp_path / "run"
    assert main(run_args(out, *NAN_LOSS, "+loss.nan_loss_at=[7,9]", "+skip_nonfinite_steps=1")) == 2
    message = capsys.readouterr().err
    assert f"{step_named(7)}: the loss is nan, the gradient norm nan; skipped (1 of skip_nonfinite_steps: 1)" in message
    assert f"{step_named(9)}: the loss is nan" in message and "(now 1, 1 skipped)" in message
    rows = metrics(out)
    assert sorted(rows) == list(range(1, 9))
    assert [rows[step]["skipped_steps"] for step in (6, 7, 8)] == [0, 1, 1]
    assert math.isnan(rows[7]["loss"])
    assert all(rows[step]["loss"] == uninterrupted[step]["loss"] for step in range(1, 7))
    assert rows[8]["lr"] == uninterrupted[8]["lr"], "the LR schedule did not move on over the skipped step"
    assert rows[8]["loss"] != uninterrupted[8]["loss"], "step 7's update was applied although it was skipped"
    assert checkpoint_folders(out) == [out / "step_5"]


def full_run(out: Path, *extra: str) -> int:
    """Two steps of the full fine-tune recipe on the tiny model, a checkpoint after each."""
    return main(["run", "full_finetune_single_device", "--config", "tiny/full_cpu", f"output_dir={out}", "epochs=1",
                 "max_steps_per_epoch=2", "save_every_n_steps=1", "keep_last_n_checkpoints=null", TRUST_HELPERS, *NAN_LOSS,
                 *extra])


def weights_and_optimizer_state(folder: Path) -> tuple[dict[str, torch.Tensor], Any]:
    state = torch.load(folder / "recipe_state.pt", weights_only=True)["optimizer"]
    return load_hf_state_dict(folder / "model"), state


def has_optimizer_state(state: dict[str, Any]) -> bool:
    """Whether any weight has optimizer state, which AdamW creates on its first step (one state dict,
    or one per weight with optimizer_in_bwd)."""
    return bool(state.get("state")) if "state" in state else any(one["state"] for one in state.values())


@pytest.mark.parametrize("in_backward", [False, True], ids=["optimizer", "optimizer_in_backward"])
def test_a_nonfinite_loss_leaves_weights_and_optimizer_state_untouched(tmp_path, in_backward):
    out = tmp_path / "run"
    assert full_run(out, "+loss.nan_loss_at=[1]", "+skip_nonfinite_steps=1", "clip_grad_norm=null",
                    f"optimizer_in_bwd={in_backward}") == 0
    base = load_hf_state_dict(Path(asset_path("tiny/model")))
    skipped, state = weights_and_optimizer_state(out / "step_1")
    assert all(torch.equal(skipped[key], base[key].float()) for key in base)
    assert not has_optimizer_state(state)
    after, state = weights_and_optimizer_state(out / "step_2")
    assert has_optimizer_state(state), "the next, finite step did not step: the test proved nothing"
    assert not torch.equal(after["output.weight"], base["output.weight"].float())


def test_a_nonfinite_gradient_under_a_finite_loss_leaves_the_weights_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert full_run(out, "+loss.nan_gradient_at=[1]", "+skip_nonfinite_steps=1") == 0
    assert "the gradient norm nan; skipped (1 of skip_nonfinite_steps: 1)" in capsys.readouterr().err
    base = load_hf_state_dict(Path(asset_path("tiny/model")))
    skipped, state = weights_and_optimizer_state(out / "step_1")
    assert all(torch.equal(skipped[key], base[key].float()) for key in base)
    assert not has_optimizer_state(state)


def test_a_nonfinite_gradient_after_optimizer_in_backward_stepped_stops_whatever_the_skip_budget(tmp_path, capsys):
    out = tmp_path / "run"
    assert full_run(out, "+loss.nan_gradient_at=[1]", "+skip_nonfinite_steps=5", "clip_grad_norm=null",
                    "optimizer_in_bwd=True") == 2
    message = capsys.readouterr().err
    assert re.search(r"step 1: the gradient norm is nan .* optimizer_in_bwd: True had already stepped", message)
    assert "There is no complete checkpoint yet." in message
    assert checkpoint_folders(out) == []


# --- a folder that cannot be written, a disk that fills up -------------------------------------


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "no permission"])
def test_an_output_folder_turning_unwritable_stops_at_the_next_checkpoint_naming_it(
    tmp_path, uninterrupted, capsys, monkeypatch, code
):
    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def mkdir(path: Path, *args: Any, **kwargs: Any) -> None:
        if path.name.startswith(f"{TMP_PREFIX}step_") and (out / "step_5").exists():
            raise OSError(code, os.strerror(code), str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(run_args(out)) == 2
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert f"could not write the checkpoint {out / 'step_10'}: {os.strerror(code)} [{errno.errorcode[code]}]" in message
    assert f"The newest complete checkpoint is {out / 'step_5'}" in message
    assert resume_and_compare(out, uninterrupted) == 5


def test_a_disk_without_room_for_the_next_checkpoint_stops_before_writing_it(
    tmp_path, uninterrupted, capsys, monkeypatch
):
    out = tmp_path / "run"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=1000) if (out / "step_5").exists() else real_usage(path))
    assert main(run_args(out)) == 2
    monkeypatch.undo()
    message = capsys.readouterr().err
    needed = folder_bytes(out / "step_5")  # the estimate: the previous checkpoint's size
    assert (f"the checkpoint {out / 'step_10'} needs about {needed / 2**20:.1f} MiB but its disk has 0.0 MiB free"
            in message)
    assert not leftovers(out) and checkpoint_folders(out) == [out / "step_5"]
    assert resume_and_compare(out, uninterrupted) == 5


def torch_save_filling_the_disk(out: Path, partial: list[Path]) -> Callable[..., None]:
    """torch.save as it fails on a full disk (as measured on a small tmpfs): it leaves the part it
    wrote and raises a RuntimeError that says nothing about space. Strikes after step_5."""
    real_save = torch.save

    def save(obj: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        if not (out / "step_5").exists():
            return real_save(obj, path, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(path).write_bytes(buffer.getvalue()[:100])
        partial.append(Path(path))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    return save


def safetensors_filling_the_disk(out: Path, partial: list[Path]) -> Callable[..., None]:
    """safetensors' save_file as it fails on a full disk: it deletes its partial file and names the
    OS error only in its message. Strikes after step_5."""
    real_save_file = peft.save_file

    def save_file(tensors: dict[str, torch.Tensor], path: Path, *args: Any, **kwargs: Any) -> None:
        if not (out / "step_5").exists():
            return real_save_file(tensors, path, *args, **kwargs)
        partial.append(Path(path))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_disk_filling_up_during_a_write_stops_naming_it_and_leaves_no_partial_folder(
    tmp_path, uninterrupted, capsys, monkeypatch, writer
):
    out = tmp_path / "run"
    partial: list[Path] = []
    if writer == "torch.save":
        monkeypatch.setattr(torch, "save", torch_save_filling_the_disk(out, partial))
    else:
        monkeypatch.setattr(peft, "save_file", safetensors_filling_the_disk(out, partial))
    real_usage = shutil.disk_usage
    # The disk is full for as long as the part written is on it.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=0)
                        if any(p.exists() for p in partial) else real_usage(path))
    assert main(run_args(out)) == 2
    monkeypatch.undo()
    message = capsys.readouterr().err
    assert partial and partial[0].relative_to(out).parts[0].startswith(f"{TMP_PREFIX}step_10-"), "another write failed"
    assert f"could not write the checkpoint {out / 'step_10'}: No space left on device [ENOSPC]" in message
    assert "free some space or set output_dir to another disk" in message
    assert not leftovers(out) and checkpoint_folders(out) == [out / "step_5"]
    assert resume_and_compare(out, uninterrupted) == 5
