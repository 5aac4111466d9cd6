"""An output folder belongs to one run: a new run never replaces, prunes or mixes its logs with
another run's checkpoints, two live runs never share it, and a run's leftovers are cleaned up
only by the run holding the folder."""

import fcntl
import json
import os
import socket
import subprocess

from faults_helpers import (
    command,
    metrics,
    pause_args,
    paused_write_command,
    release,
    run_args,
    wait_paused,
)

from tunelite.checkpointing.atomic import MANIFEST, TMP_PREFIX, atomic_folder
from tunelite.checkpointing.output_dir import LOCK_FILE
from tunelite.checkpointing.state import checkpoint_folders, prune_checkpoints
from tunelite.cli.main import main

SHORT = ["epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=2"]


def run_id(folder) -> str:
    return json.loads((folder / MANIFEST).read_text())["run_id"]


def tree(folder) -> dict[str, bytes]:
    """The files a run wrote into `folder` (the lock file left out), with their contents."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped), so no process has it for now."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_new_run_into_a_folder_holding_a_finished_run_is_refused_naming_what_is_there(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(out, *SHORT)) == 0
    before = tree(out)
    capsys.readouterr()
    assert main(run_args(out, *SHORT)) == 2
    message = capsys.readouterr().err
    assert f"output_dir {out} holds another run" in message
    assert "step_2, step_4" in message and "logs" in message
    assert "resume_from_checkpoint=True" in message and "overwrite_output_dir=True" in message
    assert tree(out) == before, "the refused run changed the folder"


def test_overwrite_output_dir_moves_the_previous_run_aside_and_a_shorter_run_keeps_its_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(out, "epochs=1", "max_steps_per_epoch=10", "save_every_n_steps=5",
                          "keep_last_n_checkpoints=2")) == 0
    previous, previous_id = tree(out), run_id(out / "step_10")
    capsys.readouterr()
    # Shorter: its step_4 ranks below the old step_5 and step_10, which pruning used to keep instead.
    assert main(run_args(out, *SHORT, "keep_last_n_checkpoints=2", "+overwrite_output_dir=True")) == 0
    printed = capsys.readouterr()
    moved = out / ".previous" / previous_id
    assert f"moved the previous run (step_5, step_10, logs) to {moved}" in printed.out
    assert tree(moved) == previous, "the previous run was not kept whole"
    assert checkpoint_folders(out) == [out / "step_2", out / "step_4"]
    assert run_id(out / "step_4") != previous_id
    assert f"done: {out / 'step_4' / 'adapter'} (peft layout)" in printed.out
    assert sorted(metrics(out)) == [1, 2, 3, 4], "the new run's logs are mixed with the old run's"


def test_every_checkpoint_records_the_run_id_and_a_resumed_run_keeps_it(tmp_path):
    out = tmp_path / "run"
    assert main(run_args(out, "epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=null")) == 0
    first = run_id(out / "step_4")
    assert main(run_args(out, "epochs=2", "max_steps_per_epoch=4", "save_every_n_steps=null",
                         "resume_from_checkpoint=True")) == 0
    assert run_id(out / "step_8") == first


def test_pruning_deletes_only_this_runs_checkpoints(tmp_path):
    for step, owner in [(1, "theirs"), (2, "ours"), (3, "ours"), (4, "theirs"), (5, "ours")]:
        with atomic_folder(tmp_path / f"step_{step}", run_id=owner) as folder:
            (folder / "x").write_text(owner)
    prune_checkpoints(tmp_path, keep_last_n=1, run_id="ours")
    assert [f.name for f in checkpoint_folders(tmp_path)] == ["step_1", "step_4", "step_5"]


def test_a_second_live_run_on_the_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out, gate = tmp_path / "run", tmp_path
    proc = subprocess.Popen(command(out, *SHORT, *pause_args(gate, 3)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_paused(gate, 3, proc)  # step_2 written, step 3 under way
        for resume in ("False", "True"):
            assert main(run_args(out, *SHORT, f"resume_from_checkpoint={resume}")) == 2
            message = capsys.readouterr().err
            assert f"output_dir {out} is in use by another run: process {proc.pid} on {socket.gethostname()}" in message
        release(gate, 3)
        assert proc.wait() == 0
    finally:
        proc.kill()
    rows = [json.loads(line) for path in (out / "logs").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4], "a refused run logged steps"


def test_a_run_starting_with_resume_leaves_a_live_runs_temporary_folder_alone(tmp_path, capsys):
    out, gate = tmp_path / "run", tmp_path
    proc = subprocess.Popen(paused_write_command(gate, 2, out, *SHORT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_paused(gate, "write", proc)  # step_2's recipe_state.pt half-written
        assert main(run_args(out, *SHORT, "resume_from_checkpoint=True")) == 2
        assert "is in use by another run" in capsys.readouterr().err
        assert list(out.glob(f"{TMP_PREFIX}step_2-*")), "the live run's temporary folder was deleted"
        release(gate, "write")
        assert proc.wait() == 0
    finally:
        proc.kill()
    assert checkpoint_folders(out) == [out / "step_2", out / "step_4"]


def test_the_lock_of_a_run_that_died_is_taken_over_and_its_temporaries_removed(tmp_path, capsys):
    out, gate = tmp_path / "run", tmp_path
    proc = subprocess.Popen(paused_write_command(gate, 4, out, *SHORT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_paused(gate, "write", proc)
    proc.kill()
    proc.wait()
    assert list(out.glob(f"{TMP_PREFIX}step_4-*"))
    assert main(run_args(out, *SHORT, "resume_from_checkpoint=True")) == 0
    printed = capsys.readouterr().out
    assert f"output_dir {out} was held by process {proc.pid} on {socket.gethostname()} (started " in printed
    assert "which is gone; taking the folder over" in printed
    assert not list(out.glob(f"{TMP_PREFIX}*"))
    assert checkpoint_folders(out) == [out / "step_2", out / "step_4"]


def test_a_lock_still_held_in_the_name_of_a_process_that_is_gone_is_taken_over(tmp_path, capsys):
    """A lock held by a descendant that outlived the run (a forked worker keeps the descriptor): the
    process it names is gone from this host, so the folder is taken over."""
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    with open(out / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}))
        held.flush()
        assert main(run_args(out, *SHORT)) == 0
    printed = capsys.readouterr().out
    assert f"output_dir {out} was held by process {pid} on {socket.gethostname()} (started 2026-01-01 00:00:00), " \
           "which is gone; taking the folder over" in printed
    assert checkpoint_folders(out) == [out / "step_2", out / "step_4"]


def test_an_output_folder_that_cannot_be_created_is_refused_before_anything_runs(tmp_path, capsys):
    # A path under a regular file: no one can create it, root included, unlike a chmod-ed folder.
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    assert main(run_args(out, f"metric_logger.1.log_dir={tmp_path / 'logs'}")) == 2
    message = capsys.readouterr().err
    assert f"output_dir: cannot create {out}: {tmp_path / 'a_file'} is a file, not a folder" in message
    assert "choose another folder" in message
    assert not (tmp_path / "logs").exists(), "the run started before refusing its output folder"


def test_the_lock_file_names_no_one_once_the_run_has_ended(tmp_path):
    out = tmp_path / "run"
    assert main(run_args(out, *SHORT)) == 0
    assert (out / LOCK_FILE).read_text() == ""
    assert os.listdir(out) and sorted(p.name for p in out.iterdir()) == sorted([LOCK_FILE, "logs", "step_2", "step_4"])
