"""The distributed LoRA and full fine-tune recipes under torchrun, on the CPU through gloo: each
trains exactly as its single-device recipe does on the same global batch (LoRA on one machine and
across two), resumes after a kill to the same bits, and LoRA shards NF4 (QLoRA) base weights, or,
with fsdp_shard_frozen_weights: False, keeps the frozen base whole on every process and trains
and saves to the bits of the sharded run. A second run into a used output folder is refused by
every rank; a resumed full fine-tune applies a changed optimizer setting."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from safetensors.torch import load_file
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from tunelite.checkpointing.state import Progress, load_training_state, save_checkpoint
from tunelite.cli.main import main
from tunelite.config import instantiate, load_recipe_config
from tunelite.distributed.process import process_group
from tunelite.distributed.sharding import (
    ShardedStateOptimizer,
    gather_full_state_dict,
    init_adapters,
    load_sharded_checkpoint,
    shard_model,
)
from tunelite.modules.lora import set_trainable_params
from tunelite.modules.nf4 import NF4Tensor, dequantize, quantize_nf4
from tunelite.recipe_registry import get_recipe, read_declarations
from tunelite.checkpointing import loading
from tunelite.data.sampler import ResumableSampler
from tunelite.training.schedulers import cosine_schedule_with_warmup

# Two optimizer steps of two micro-batches each, a checkpoint and a validation loss after the
# first (the save then follows a forward without backward), clipping on: every part of the step.
COMMON = ["epochs=1", "max_steps_per_epoch=2", "gradient_accumulation_steps=2", "log_every_n_steps=1",
          "save_every_n_steps=1", "keep_last_n_checkpoints=null", "+dataset.val_fraction=0.1", "+eval_every_n_steps=1"]
QLORA = "model._component_=tunelite.models.qlora_llama3_1_tiny"
# (recipe, tiny config) of each distributed recipe.
LORA = ("lora_finetune_distributed", "tiny/lora_distributed_cpu")
FULL = ("full_finetune_distributed", "tiny/full_distributed_cpu")
# One thread per process: two processes share this machine's two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tunelite_command(out: Path, torchrun: list[str], *overrides: str) -> list[str]:
    return [sys.executable, "-m", "tunelite.cli.main", "run", "lora_finetune_distributed", *torchrun,
            "--config", "tiny/lora_distributed_cpu", f"output_dir={out}", *COMMON, *overrides]


def torchrun_command(out: Path, *overrides: str, recipe: tuple[str, str] = LORA) -> list[str]:
    """Two processes of 4 samples each: the global batch of 8 of the single-device reference.
    torchrun itself, sparing the seconds `tunelite run` spends validating the config first."""
    name, config = recipe
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            str(get_recipe(name).path), "--config", config, f"output_dir={out}", *COMMON, *overrides]


def run_distributed(out: Path, *overrides: str, recipe: tuple[str, str] = LORA) -> None:
    done = subprocess.run(torchrun_command(out, *overrides, recipe=recipe), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def run_single_device(out: Path, config: str, recipe: str = "lora_finetune_single_device") -> None:
    assert main(["run", recipe, "--config", config, f"output_dir={out}", "batch_size=8", *COMMON]) in (0, None)


def metrics(out: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value over the run's metrics files, a resumed run's rows overriding earlier ones."""
    found = {}
    for path in sorted((out / "logs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        for row in map(json.loads, path.read_text().splitlines()):
            found.update({(row["step"], name): row[name] for name in ("loss", "grad_norm", "val_loss") if name in row})
    return found


def assert_same_training(out: Path, reference: Path, atol: float = 1e-5,
                         weights: tuple[str, ...] = ("adapter/adapter_model.safetensors", "model/model.safetensors")
                         ) -> None:
    """Same losses, gradient norms and validation losses step by step, and the same weights files
    (by default the adapter and the merged model) at the end."""
    ours, theirs = metrics(out), metrics(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=atol), key
    for file in weights:
        ours, theirs = load_file(out / "step_2" / file), load_file(reference / "step_2" / file)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    run_single_device(out, "tiny/lora_cpu")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_batches_together_are_the_single_process_batch():
    for shuffle in (True, False):
        single = list(ResumableSampler(103, shuffle, seed=3).indices())
        ranks = [ResumableSampler(103, shuffle, seed=3, rank=r, world_size=2).indices() for r in range(2)]
        for k in range(103 // 8):
            assert sorted(ranks[0][4 * k:4 * k + 4] + ranks[1][4 * k:4 * k + 4]) == sorted(single[8 * k:8 * k + 8])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two processes, every weight sharded; activation checkpointing on as well: it must compose
    with the sharded layers."""
    out = tmp_path_factory.mktemp("sharded")
    run_distributed(out, "enable_activation_checkpointing=True")
    return out


def test_two_processes_train_as_one_on_the_same_global_batch(sharded, single_device):
    assert_same_training(sharded, single_device)


def test_a_frozen_base_whole_on_each_process_trains_saves_and_resumes_to_the_sharded_runs_bits(
        tmp_path, single_device, sharded):
    """Only the adapters sharded: the gathered weights were the same numbers, so the losses, the
    adapter and the merged model are the sharded run's to the bit; resumed from its step 1
    checkpoint, it ends on the same step 2."""
    whole = ["enable_activation_checkpointing=True", "fsdp_shard_frozen_weights=False"]
    run_distributed(tmp_path / "whole", *whole)
    assert_same_training(tmp_path / "whole", single_device)
    assert_same_training(tmp_path / "whole", sharded, atol=0)
    run_distributed(tmp_path / "resumed", *whole, f"resume_from_checkpoint={tmp_path / 'whole' / 'step_1'}")
    resumed, uninterrupted = metrics(tmp_path / "resumed"), metrics(tmp_path / "whole")
    assert resumed.keys() == {key for key in uninterrupted if key[0] == 2}
    assert all(resumed[key] == uninterrupted[key] for key in resumed)
    for file in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        ours, theirs = load_file(tmp_path / "resumed" / "step_2" / file), load_file(tmp_path / "whole" / "step_2" / file)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_two_nodes_of_one_process_each_train_as_one(tmp_path, single_device):
    """Two torchrun launches on one host, as on two machines: static rendezvous at a master address."""
    port = str(free_port())
    nodes = []
    for rank in range(2):
        torchrun = ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                    "--master_addr", "127.0.0.1", "--master_port", port]
        nodes.append(subprocess.Popen(tunelite_command(tmp_path, torchrun), env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    for node in nodes:
        _, stderr = node.communicate(timeout=120)
        assert node.returncode == 0, stderr.decode()[-2000:]
    assert_same_training(tmp_path, single_device)


@pytest.mark.parametrize("shard_frozen", [True, False])
def test_nf4_base_weights_sharded_or_whole_train_as_on_one_device(tmp_path, monkeypatch, shard_frozen):
    # Sharding needs whole NF4 scale blocks in each shard; at the tiny model's sizes that means
    # half the single-device block, so the reference quantizes with it too. Left whole, the base
    # is quantized as on one device.
    if shard_frozen:
        monkeypatch.setattr(loading, "quantize_nf4", partial(quantize_nf4, shards=2))
    run_single_device(tmp_path / "single", "tiny/qlora_cpu")
    run_distributed(tmp_path / "distributed", QLORA, f"fsdp_shard_frozen_weights={shard_frozen}")
    assert_same_training(tmp_path / "distributed", tmp_path / "single")


def check_frozen_base_left_whole(rank: int, rendezvous: str) -> None:
    """One of two processes: after shard_model(shard_frozen=False) and load_sharded_checkpoint, of
    the tiny LoRA and QLoRA models, each frozen weight is a plain tensor holding the whole
    checkpoint tensor (NF4: quantized whole, as on one device), each adapter a DTensor of which
    this process holds half the rows; gathering for saving gives rank 0 the frozen weights as loaded."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        name, config = LORA
        for builder in ("lora_llama3_1_tiny", "qlora_llama3_1_tiny"):
            cfg = load_recipe_config(config, read_declarations(get_recipe(name).path).keys,
                                     [f"model._component_=tunelite.models.{builder}"])
            checkpointer = instantiate(cfg.checkpointer)
            with torch.device("meta"):
                model = instantiate(cfg.model)
            init_adapters(model, torch.float32)
            set_trainable_params(model)
            shard_model(model, torch.device("cpu"), torch.float32, True, shard_frozen=False)
            load_sharded_checkpoint(model, checkpointer, torch.device("cpu"), torch.float32)
            checkpoint, quantized = checkpointer.load(model.args), loading.nf4_weight_names(model)
            assert bool(quantized) == builder.startswith("qlora")
            expected = {key: value.float() for key, value in checkpoint.items()}
            expected.update({key: dequantize(quantize_nf4(expected[key])) for key in quantized})
            for key, param in model.named_parameters():
                if param.requires_grad:
                    assert isinstance(param, DTensor) and tuple(param.placements) == (Shard(0),), key
                    assert param.to_local().shape[0] < param.shape[0], key
                else:
                    assert not isinstance(param, DTensor) and isinstance(param, NF4Tensor) == (key in quantized), key
                    assert torch.equal(dequantize(param), expected[key]), key
            gathered = gather_full_state_dict(model, keep=lambda key: key in expected)
            assert gathered.keys() == (expected.keys() if rank == 0 else set())
            assert all(torch.equal(gathered[key], expected[key]) for key in gathered)
    finally:
        dist.destroy_process_group()


def test_an_fsdp2_unit_is_recomputed_whole_even_by_block(one_process_group):
    # By block a unit would be called twice a forward: its weights gathered twice, its gradients
    # reduced in two parts. FSDP2 units stay whole, and train as the unsharded model does.
    from test_memory_policy import TINY, gradients, lora_model, mlp_calls

    reference, model = gradients(lora_model(), ("recompute",) * TINY.num_layers), lora_model()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    calls = mlp_calls(model)
    ours = gradients(model, ("recompute",) * TINY.num_layers, mlp_chunk_tokens=16, by_block=True)
    assert len(calls) == 14 * TINY.num_layers  # 5 chunks, 4 + 5 again: the whole layer's recomputation
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name].full_tensor(), grad, rtol=0, atol=1e-6)


def test_shard_model_leaves_the_frozen_base_whole_and_shards_the_adapters(tmp_path):
    torch.multiprocessing.spawn(check_frozen_base_left_whole, args=(str(tmp_path / "rendezvous"),), nprocs=2)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_until_gone(pid: int, timeout: float = 60) -> None:
    """Waits for a killed process that is not our child (so not ours to reap) to disappear."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # reaped
        if state == "Z":
            return  # dead, waiting for its parent to read its exit status
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.01)


def kill_resume_and_compare(tmp_path: Path, args: list[str], final: str, recipe: tuple[str, str] = LORA) -> None:
    """An uninterrupted run, and one killed (SIGKILL, launcher and workers at once) after its step 4
    checkpoint and resumed: the same metrics and, bit for bit, the same `final` weights file."""
    run_distributed(tmp_path / "uninterrupted", *args, recipe=recipe)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_command(killed, *args, recipe=recipe), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (killed / "step_4").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    workers = children(proc.pid)
    assert len(workers) == 2, f"torchrun's workers not found: {workers}"
    for pid in workers:  # each in a session of its own (torchrun's doing), out of reach of killpg
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in workers:
        wait_until_gone(pid)
    assert not (killed / "step_10").exists(), "the run finished before the kill; the test proved nothing"

    run_distributed(killed, *args, "resume_from_checkpoint=True", recipe=recipe)
    after, uninterrupted = metrics(killed), metrics(tmp_path / "uninterrupted")
    assert after.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert after[key] == value, key
    ours, theirs = load_file(killed / final), load_file(tmp_path / "uninterrupted" / final)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path):
    # Dropout on, so the resumed ranks also need their own RNG states back.
    args = ["epochs=2", "max_steps_per_epoch=null", "model.lora_dropout=0.1", "save_every_n_steps=4",
            "eval_every_n_steps=null", "save_merged_model=False"]
    kill_resume_and_compare(tmp_path, args, "step_10/adapter/adapter_model.safetensors")


@pytest.fixture(scope="module")
def full_single_device(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full_single")
    run_single_device(out, "tiny/full_cpu", recipe="full_finetune_single_device")
    return out


def test_full_fine_tune_over_two_processes_trains_as_one_on_the_same_global_batch(tmp_path, full_single_device):
    # Each layer recomputed and its input offloaded: the memory policy must compose with the sharded layers.
    run_distributed(tmp_path, "enable_activation_checkpointing=True", "+enable_activation_offloading=True",
                    recipe=FULL)
    assert_same_training(tmp_path, full_single_device, weights=("model/model.safetensors",))


def test_full_fine_tune_resumes_after_sigkill_to_the_same_bits(tmp_path):
    """The weights come back from the checkpoint's HF folder and each rank's optimizer shards from
    its optimizer/ folder (torch.distributed.checkpoint)."""
    args = ["epochs=2", "max_steps_per_epoch=null", "save_every_n_steps=4", "eval_every_n_steps=null"]
    kill_resume_and_compare(tmp_path, args, "step_10/model/model.safetensors", recipe=FULL)


def test_a_second_full_fine_tune_on_the_same_output_dir_is_refused_by_every_rank(tmp_path):
    """Rank 0 finds the first run's checkpoints and logs, and every rank stops on its word before
    anything is written."""
    run_distributed(tmp_path, "max_steps_per_epoch=1", "gradient_accumulation_steps=1", recipe=FULL)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = subprocess.run(torchrun_command(tmp_path, "max_steps_per_epoch=1", recipe=FULL), env=ENV,
                          capture_output=True)
    assert done.returncode != 0
    assert done.stderr.decode().count(f"error: output_dir {tmp_path} holds another run (step_1, logs)") == 2
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.fixture
def one_process_group(tmp_path):
    """A process group of this test's process alone: FSDP2 and torch.distributed.checkpoint run as
    under torchrun, without starting processes."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_recipes_sharded_model_is_freed_before_its_process_group_is_destroyed(monkeypatch):
    """FSDP2's modules hold the group through their mesh, in reference cycles: left to the
    interpreter's exit, their gloo threads abort the process (a rank's SIGABRT after training)."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    alive_at_destroy = []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: alive_at_destroy.append(model() is not None) or destroy())
    gc.disable()  # only the context's own collection may free the cycle
    try:
        with process_group(torch.device("cpu")):
            sharded = fully_shard(nn.Sequential(nn.Linear(8, 8)))
            sharded.cycle = [sharded]
            model = weakref.ref(sharded)
            del sharded
    finally:
        gc.enable()
    assert alive_at_destroy == [False]


def test_a_resumed_full_fine_tune_gets_its_moments_from_the_shards_and_a_changed_setting_from_the_config(
        tmp_path, one_process_group):
    def build(weight_decay: float) -> tuple[nn.Module, ShardedStateOptimizer, object]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        fully_shard(model)
        optimizer = ShardedStateOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2,
                                                                   weight_decay=weight_decay))
        return model, optimizer, cosine_schedule_with_warmup(optimizer, 2, num_training_steps=10)

    model, optimizer, scheduler = build(weight_decay=0.0)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    fingerprint = {"model": "two linears"}
    folder = save_checkpoint(tmp_path / "out", Progress(step=1, step_in_epoch=1), optimizer.save_shards, optimizer,
                             scheduler, fingerprint, {"optimizer": {"weight_decay": 0.0}}, None, "run")
    saved = {key: value.to_local().clone() for key, value in optimizer.optimizer.state[model[0].weight].items()
             if key != "step"}

    model, optimizer, scheduler = build(weight_decay=0.1)
    optimizer.load_shards(folder)
    load_training_state(folder, optimizer, scheduler, fingerprint, {"optimizer": {"weight_decay": 0.1}}, 10)
    state = optimizer.optimizer.state[model[0].weight]
    assert state["step"].item() == 1 and all(torch.equal(state[key].to_local(), saved[key]) for key in saved)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-2)  # the schedule's after one step of warm-up


def test_without_torchrun_the_recipe_says_how_to_launch_it(tmp_path, capsys):
    assert main(["run", "lora_finetune_distributed", "--config", "tiny/lora_distributed_cpu",
                 f"output_dir={tmp_path}"]) == 2
    assert "--nproc_per_node" in capsys.readouterr().err
