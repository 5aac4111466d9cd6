"""A loss far above its recent history stops the run before the optimizer takes the step, and the
message names the newest checkpoint from before the loss began climbing, not merely the newest."""

import os
import subprocess
import sys

import pytest
import torch
from faults_helpers import FAULTY_LOSS, command, last_step, pause_args, run_args, wait_paused
from safetensors.torch import load_file
from test_faults import step_named

from tunelite.checkpointing.state import checkpoint_folders
from tunelite.cli.main import main
from tunelite.recipe_registry import get_recipe

# Eight steps, a checkpoint every two, the loss multiplied at steps `scale_at` by `scale_by` (CLIMB: 5, 6 and 7).
SHORT = ["epochs=1", "max_steps_per_epoch=8", "save_every_n_steps=2", FAULTY_LOSS]
CLIMB = [*SHORT, "+loss.scale_at=[5,6,7]"]


def error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("error: "))


def largest_adapter_weight(folder) -> float:
    return max(t.abs().max().item() for t in load_file(folder / "adapter" / "adapter_model.safetensors").values())


def test_a_learning_rate_of_1e6_stops_at_the_first_blown_up_loss_naming_a_checkpoint_with_sound_weights(
    tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(run_args(out, "optimizer.lr=1e6", "save_every_n_steps=1")) == 2
    message = capsys.readouterr().err
    # Step 1 trains at lr 0 (warm-up), step 2 at 2e5: the weights it leaves make step 3's loss explode.
    assert f"{step_named(3)}: the loss is " in message
    assert "more than divergence_factor (10.0) x the median" in message
    assert "the optimizer did not step" in message
    assert f"The newest checkpoint from before the loss began climbing (at step 3) is {out / 'step_1'}" in message
    assert f"resume_from_checkpoint={out / 'step_1'}" in message
    assert last_step(out) == 2 and checkpoint_folders(out) == [out / "step_1", out / "step_2"]
    assert largest_adapter_weight(out / "step_2") > 1e3, "step_2 is sound: the test proved nothing"
    assert largest_adapter_weight(out / "step_1") < 1


def test_a_loss_climbing_over_several_steps_names_the_checkpoint_from_before_the_climb(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(out, *CLIMB, "+loss.scale_by=[2,4,40]")) == 2
    message = capsys.readouterr().err
    assert f"{step_named(7)}: the loss is " in message
    # Step 5's loss, from the weights after step 4, is the first out of band: step_4 is suspect, step_2 is not.
    assert f"The newest checkpoint from before the loss began climbing (at step 5) is {out / 'step_2'}" in message
    assert f"({out / 'step_4'}, {out / 'step_6'} came after it)" in message
    assert last_step(out) == 6


def test_divergence_factor_null_lets_such_losses_through(tmp_path):
    out = tmp_path / "run"
    assert main(run_args(out, *CLIMB, "+loss.scale_by=[2,4,40]", "+divergence_factor=null")) == 0
    assert last_step(out) == 8


def test_a_loss_below_the_first_steps_is_never_divergent(tmp_path):
    """Late in a run the loss can be far below where it began: ten times a tiny median is still low.
    Here steps 2 to 7 are a hundredth of the first step's, and step 8 twenty times those."""
    out = tmp_path / "run"
    assert main(run_args(out, *SHORT, "+loss.scale_at=[2,3,4,5,6,7,8]",
                         "+loss.scale_by=[0.01,0.01,0.01,0.01,0.01,0.01,0.2]")) == 0
    assert last_step(out) == 8


def test_a_resumed_run_decides_as_the_uninterrupted_one_would(tmp_path, capsys):
    """Steps 5 and 6 three times higher, step 7 25 times: against the whole history (median: the
    normal loss) step 7 diverges; against steps 5 and 6 alone (a resume that forgot the history) it
    would not."""
    scale = [*CLIMB, "+loss.scale_by=[3,3,25]"]
    assert main(run_args(tmp_path / "uninterrupted", *scale)) == 2
    uninterrupted = error_line(capsys.readouterr().err)
    assert step_named(7) in uninterrupted

    out, gate = tmp_path / "run", tmp_path
    proc = subprocess.Popen(command(out, *scale, *pause_args(gate, 5)[1:]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_paused(gate, 5, proc)  # step_4 written
    proc.kill()
    proc.wait()
    assert main(run_args(out, *scale, "+loss.first_call=5", "resume_from_checkpoint=True")) == 2
    resumed = error_line(capsys.readouterr().err)
    assert resumed.replace(str(out), str(tmp_path / "uninterrupted")) == uninterrupted


# A short run of each training recipe at a learning rate that blows its weights up over the warm-up
# (at step 2, lr 2e5 for the adapters; a full fine-tune diverges sooner), the distributed ones on
# two CPU processes.
RECIPES = [
    ("lora_finetune_single_device", "tiny/lora_cpu", "1e6"),
    ("full_finetune_single_device", "tiny/full_cpu", "30"),
    ("lora_dpo_single_device", "tiny/lora_dpo_cpu", "1e6"),
]
BLOW_UP = ["epochs=1", "max_steps_per_epoch=6", "save_every_n_steps=null", "log_every_n_steps=1"]


@pytest.mark.parametrize("recipe,config,lr", RECIPES)
def test_each_training_recipe_stops_a_diverging_run(tmp_path, capsys, recipe, config, lr):
    assert main(["run", recipe, "--config", config, f"output_dir={tmp_path}", f"optimizer.lr={lr}", *BLOW_UP]) == 2
    message = capsys.readouterr().err
    assert "step 3 (dataset samples " in message and "more than divergence_factor (10.0) x the median" in message


@pytest.mark.parametrize("recipe,config,lr", [("lora_finetune_distributed", "tiny/lora_distributed_cpu", "1e6"),
                                              ("full_finetune_distributed", "tiny/full_distributed_cpu", "30")])
def test_each_distributed_recipe_stops_a_diverging_run_on_every_rank(tmp_path, recipe, config, lr):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(get_recipe(recipe).path), "--config", config, f"output_dir={tmp_path}", f"optimizer.lr={lr}", *BLOW_UP],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert done.returncode != 0
    assert done.stderr.decode().count("more than divergence_factor (10.0) x the median") == 2, done.stderr.decode()[-3000:]


def test_the_loss_history_travels_in_the_recipe_state(tmp_path):
    out = tmp_path / "run"
    assert main(run_args(out, "epochs=1", "max_steps_per_epoch=3", "save_every_n_steps=null")) == 0
    progress = torch.load(out / "step_3" / "recipe_state.pt", weights_only=True)["progress"]
    assert [step for step, _ in progress["losses"]] == [1, 2, 3]
    assert progress["first_loss"] == progress["losses"][0][1]
