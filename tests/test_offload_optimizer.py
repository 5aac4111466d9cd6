"""The overlapped CPU AdamW trains as torch's AdamW does, resumes to the same bits, never lets a
non-finite gradient reach a weight, and does its work in the order that makes the overlap safe:
every gradient landed before any update, each weight sent back before its block's next forward,
the first blocks' forward while the last parameters are still being updated."""

import copy
import functools
import importlib.util
import io
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY, random_model

from tunelite.checkpointing.hf import hf_config_from_model_args, load_hf_state_dict
from tunelite.cli.main import main
from tunelite.errors import ConfigError, ResourceError
from tunelite.models.llama3_1 import LLAMA3_1_8B
from tunelite.modules.loss import LinearCrossEntropyLoss
from tunelite.runtime import host
from tunelite.training import offload_optimizer
from tunelite.training.offload_optimizer import (
    OverlappedCPUAdamW,
    _StagingRing,
    device_memory,
    forward_blocks,
    host_memory,
    overlapped_cpu_adamw,
)
from tunelite.training.schedulers import cosine_schedule_with_warmup

LR, WEIGHT_DECAY = 3e-4, 0.1


def micro_batches(steps: int, accumulation: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, TINY.vocab_size, (2, 16), generator=g) for _ in range(accumulation)]
            for _ in range(steps)]


def backward(model: torch.nn.Module, window: list[torch.Tensor]) -> None:
    """The recipe's micro-batches: each micro-batch's loss weighted by its share, backward."""
    loss_fn = LinearCrossEntropyLoss(num_chunks=2)
    for tokens in window:
        (loss_fn(model.hidden_states(tokens), tokens, model.output) / len(window)).backward()


def train_overlapped(model: torch.nn.Module, optimizer: OverlappedCPUAdamW, schedule: object,
                     steps: list[list[torch.Tensor]], clip: float | None) -> None:
    """The loop a recipe writes for this optimizer."""
    for window in steps:
        backward(model, window)
        norm = optimizer.total_grad_norm()
        assert torch.isfinite(norm)
        if clip:
            optimizer.clip_grads_with_norm_(clip, norm)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()


def train_reference(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: list[list[torch.Tensor]],
                    clip: float | None, warmup: int = 2) -> None:
    schedule = cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=len(steps))
    for window in steps:
        backward(model, window)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("on_device", [False, True], ids=["host adds", "device adds"])
@pytest.mark.parametrize("accumulation, clip", [(1, None), (3, None), (3, 0.05)])
def test_trains_as_torch_adamw_with_accumulation_clipping_and_a_schedule(accumulation, clip, on_device):
    steps = micro_batches(6, accumulation)
    model = random_model()
    plain, fused = copy.deepcopy(model), copy.deepcopy(model)
    optimizer = overlapped_cpu_adamw(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, chunk_size=1000,
                                     accumulate_on_device=on_device)
    optimizer.wait_in_forward(model)
    train_overlapped(model, optimizer, cosine_schedule_with_warmup(optimizer, 2, len(steps)), steps, clip)
    optimizer.wait()
    train_reference(plain, torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=WEIGHT_DECAY), steps, clip)
    train_reference(fused, torch.optim.AdamW(fused.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True),
                    steps, clip)
    assert max_difference(model, plain) < 1e-6
    if clip is None:  # the same kernel on the same accumulated gradients: the same bits
        assert max_difference(model, fused) == 0
    optimizer.close()


def test_a_larger_staging_ring_changes_when_gradients_wait_not_the_weights():
    steps = micro_batches(3, 3)
    model = random_model()
    larger = copy.deepcopy(model)
    numels = [p.numel() for p in model.parameters()]
    trained = []
    # twice the largest gradient (the least it takes), then room for every fp32 gradient
    for m, staging_gib in ((model, 1e-9), (larger, sum(numels) * 4 / 2**30)):
        optimizer = overlapped_cpu_adamw(m.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, chunk_size=1000,
                                         staging_gib=staging_gib)
        trained.append(optimizer._ring.buffer.numel())
        train_overlapped(m, optimizer, cosine_schedule_with_warmup(optimizer, 2, len(steps)), steps, 0.05)
        optimizer.close()
    assert trained == [2 * max(numels), sum(numels)]
    assert max_difference(model, larger) == 0
    with pytest.raises(ConfigError, match="optimizer.staging_gib: 0 is not a size"):
        overlapped_cpu_adamw(random_model().parameters(), staging_gib=0)


@pytest.mark.parametrize("on_device", [False, True], ids=["host adds", "device adds"])
def test_the_norm_is_taken_with_the_last_micro_batch_once_the_step_count_is_known(monkeypatch, on_device):
    """After a step, each gradient's norm is taken as the last micro-batch lands (by the worker,
    or on the device), so the loop's norm waits for no pass of its own; a step with another count
    still gets its true norm."""
    windows = [micro_batches(1, count, seed=i)[0] for i, count in enumerate((3, 3, 3, 2, 4))]
    model = random_model()
    plain = copy.deepcopy(model)
    optimizer = overlapped_cpu_adamw(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, chunk_size=1000,
                                     accumulate_on_device=on_device)
    after_backward = []  # parameters whose norm the loop's call had to take itself, per step
    real = offload_optimizer.squared_norm
    monkeypatch.setattr(offload_optimizer, "squared_norm", lambda *args: after_backward.append(1) or real(*args))
    schedule, taken = cosine_schedule_with_warmup(optimizer, 2, len(windows)), []
    for window in windows:
        backward(model, window)
        before = len(after_backward)
        optimizer.clip_grads_with_norm_(0.05, optimizer.total_grad_norm())
        taken.append(len(after_backward) - before)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    train_reference(plain, torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=WEIGHT_DECAY), windows, 0.05)
    assert max_difference(model, plain) < 1e-6
    parameters = len(list(model.parameters()))
    # the first step, and each step whose count differs from the one before, take them after backward
    assert taken == [parameters, 0, 0, parameters, parameters]


def test_state_dict_resumes_to_the_same_bits_from_bf16_weights():
    """bf16 weights on the model, fp32 master weights in the optimizer's state: a resumed run
    continues from the master weights, not from the rounded ones, and matches bit for bit."""
    steps = micro_batches(6, 2)
    model = random_model().to(torch.bfloat16)
    optimizer = OverlappedCPUAdamW(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    schedule = cosine_schedule_with_warmup(optimizer, 2, len(steps))
    train_overlapped(model, optimizer, schedule, steps[:3], clip=1.0)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
               saved)
    train_overlapped(model, optimizer, schedule, steps[3:], clip=1.0)
    ours = optimizer.state_dict()["state"]
    optimizer.close()

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = random_model(seed=1).to(torch.bfloat16)
    resumed.load_state_dict(state["model"])
    resumed_optimizer = OverlappedCPUAdamW(resumed.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    resumed_optimizer.wait_in_forward(resumed)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_schedule = cosine_schedule_with_warmup(resumed_optimizer, 2, len(steps))
    resumed_schedule.load_state_dict(state["schedule"])
    train_overlapped(resumed, resumed_optimizer, resumed_schedule, steps[3:], clip=1.0)

    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    theirs = resumed_optimizer.state_dict()["state"]
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in ours for k in ours[i])
    resumed_optimizer.close()


def test_a_state_of_other_parameters_is_refused():
    optimizer = OverlappedCPUAdamW(random_model().parameters())
    other = OverlappedCPUAdamW(list(random_model().parameters())[:-1])
    with pytest.raises(ValueError, match="parameters"):
        optimizer.load_state_dict(other.state_dict())
    optimizer.close()
    other.close()


@pytest.mark.parametrize("on_device", [False, True], ids=["host adds", "device adds"])
def test_events_come_in_the_order_that_makes_the_overlap_safe(on_device):
    """Gradient copied (each micro-batch) -> every gradient of the step in -> updates in forward
    order, each sent back -> the block's next forward. And the overlap: in the second step the
    worker is held before updating each block until the block before it has run its forward,
    which can only happen if forwards start while later blocks are still being updated."""
    model = random_model()
    blocks = [b for b in forward_blocks(model) if list(b.parameters())]
    block_of = {p: i for i, b in enumerate(blocks) for p in b.parameters()}
    params = list(model.parameters())
    position = {p: i for i, p in enumerate(params)}
    first_of_block = {position[next(b.parameters())]: i for i, b in enumerate(blocks)}
    log: list[tuple] = []
    ran = [threading.Event() for _ in blocks]

    def on_event(kind: str, index: int) -> None:
        if kind == "stepped" and first_of_block.get(index, 0) > 0 and ("step", 1) in log:
            assert ran[first_of_block[index] - 1].wait(timeout=60)
        log.append((kind, index))

    def forward_ran(i: int, module: torch.nn.Module, args: tuple) -> None:
        log.append(("forward", i))
        if ("step", 1) in log:
            ran[i].set()

    optimizer = OverlappedCPUAdamW(model.parameters(), lr=1e-3, on_event=on_event, accumulate_on_device=on_device)
    optimizer.wait_in_forward(model)
    for i, block in enumerate(blocks):  # after the optimizer's own hooks, so they see what those let through
        block.register_forward_pre_hook(functools.partial(forward_ran, i))
    accumulation = 2
    for step, window in enumerate(micro_batches(3, accumulation)):
        backward(model, window)
        optimizer.total_grad_norm()
        log.append(("step", step))
        optimizer.step()
        optimizer.zero_grad()
    optimizer.close()

    for step in (0, 1):
        start, end = log.index(("step", step)), log.index(("step", step + 1))
        before = log[:start] if step == 0 else log[log.index(("step", step - 1)):start]
        after = log[start:end]
        copied = [e for e in before if e[0] == "grad_copied"]
        assert sorted(copied) == sorted(("grad_copied", i) for i in range(len(params)) for _ in range(accumulation))
        stepped = [i for kind, i in after if kind == "stepped"]
        assert stepped == list(range(len(params)))  # all of them, in forward order, after every gradient
        for i, p in enumerate(params):
            sent = after.index(("weight_copied", i))
            assert after.index(("stepped", i)) < sent < after.index(("forward", block_of[p]))
    second = log[log.index(("step", 1)):log.index(("step", 2))]
    for index, block in first_of_block.items():
        if block:
            assert second.index(("forward", block - 1)) < second.index(("stepped", index))


@pytest.mark.parametrize("on_device", [False, True], ids=["host adds", "device adds"])
def test_a_nan_gradient_reaches_no_weight_and_the_skipped_step_leaves_no_trace(on_device):
    """The NaN enters the embedding's gradient, the last to land: had updates started as
    gradients landed, every other weight would have moved already."""
    model = random_model()
    reference = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    optimizer = OverlappedCPUAdamW(model.parameters(), lr=1e-3, accumulate_on_device=on_device)
    optimizer.wait_in_forward(model)
    bad, good = micro_batches(2, 2)
    poison = model.tok_embeddings.weight.register_hook(lambda grad: grad * float("nan"))
    backward(model, bad)
    poison.remove()
    assert not torch.isfinite(optimizer.total_grad_norm())
    optimizer.zero_grad()  # the loop's skip: no step
    optimizer.wait()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values()))
    assert all(int(s["step"]) == 0 for s in optimizer.state_dict()["state"].values())

    train_overlapped(model, optimizer, cosine_schedule_with_warmup(optimizer, 0, 1), [good], clip=None)
    fused = torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True)
    train_reference(reference, fused, [good], clip=None, warmup=0)
    optimizer.wait()
    assert max_difference(model, reference) == 0
    optimizer.close()


def test_a_failure_in_the_worker_is_raised_in_the_loop():
    def on_event(kind: str, index: int) -> None:
        raise OSError("disk on fire")

    model = random_model()
    optimizer = OverlappedCPUAdamW(model.parameters(), on_event=on_event)
    with pytest.raises(RuntimeError, match="worker failed") as raised:  # in a later gradient's hook, or here
        backward(model, micro_batches(1, 1)[0])
        optimizer.total_grad_norm()
    assert isinstance(raised.value.__cause__, OSError)


def test_host_memory_is_16_bytes_a_parameter_in_fp32_and_14_in_bf16():
    numels = [1024, 4096, 1024]
    fp32 = host_memory(numels, torch.bfloat16, torch.float32, chunk_size=256)
    bf16 = host_memory(numels, torch.bfloat16, torch.bfloat16, chunk_size=256)
    fixed = 2 * 4096 * 2 + 4 * 256  # staging ring (every gradient, but at least twice the largest, bf16) and scratch
    assert sum(fp32.values()) == 16 * 6144 + fixed
    assert sum(bf16.values()) == 14 * 6144 + fixed
    # the device adding into the accumulators needs no staging ring, and holds three chunks more
    # than the fp32 chunk every update's weights pass through on their way into the model
    on_device = host_memory(numels, torch.bfloat16, torch.bfloat16, chunk_size=256, accumulate_on_device=True)
    assert sum(on_device.values()) == 14 * 6144 + 4 * 256
    assert device_memory(torch.bfloat16, 256, accumulate_on_device=True) == (2 * 2 + 4) * 256 + 4 * 256
    assert device_memory(torch.bfloat16, 256) == 4 * 256
    # a larger staging ring where asked; never less than twice the largest gradient; 4 GiB by default
    assert host_memory([2**31, 2**30], torch.bfloat16)["gradient staging ring (pinned)"] == 2 * 2**31 * 2
    assert host_memory([2**28] * 32, torch.bfloat16)["gradient staging ring (pinned)"] == 4 * 2**30
    assert host_memory(numels, torch.bfloat16, staging_gib=1.0)["gradient staging ring (pinned)"] == 2**30
    assert host_memory(numels, torch.bfloat16, staging_gib=1e-9)["gradient staging ring (pinned)"] == 2 * 4096 * 2


def test_a_machine_without_that_much_free_memory_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:       1024 kB\n")
    monkeypatch.setattr(host, "MEMINFO", meminfo)
    with pytest.raises(ResourceError, match=r"needs 0\.0 GiB .* only 0\.0 GiB is available .*accumulation_dtype: bf16"):
        overlapped_cpu_adamw(random_model().parameters())


def test_the_staging_ring_hands_out_regions_in_order_and_waits_when_full():
    ring = _StagingRing(torch.arange(10))
    a, b = ring.reserve(4, check=lambda: None), ring.reserve(4, check=lambda: None)
    assert a[0] == 0 and b[0] == 4
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(ring.reserve(3, check=lambda: None)))
    waiter.start()  # 2 free at the end, none at the start: it waits
    waiter.join(timeout=0.2)
    assert not got
    ring.release()  # the oldest (0..3) is free: it wraps around
    waiter.join(timeout=60)
    assert got[0][0] == 0 and got[0].numel() == 3


def test_the_waits_stay_out_of_a_compiled_layers_graph():
    """fullgraph=True fails on any graph break: the forward's wait for weights (threads and
    events) must run beside a compiled layer, not inside its graph."""
    model = random_model()
    reference = copy.deepcopy(model)
    optimizer = OverlappedCPUAdamW(model.parameters(), lr=1e-3)
    optimizer.wait_in_forward(model)
    for layer in model.layers:
        layer.compile(backend="eager", fullgraph=True)
    steps = micro_batches(2, 1)
    train_overlapped(model, optimizer, cosine_schedule_with_warmup(optimizer, 0, 2), steps, clip=None)
    optimizer.wait()
    train_reference(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True), steps, clip=None,
                    warmup=0)
    assert max_difference(model, reference) < 1e-6
    optimizer.close()


# --- in the full fine-tune recipe ----------------------------------------------------------------

OVERLAPPED = ["optimizer._component_=tunelite.training.offload_optimizer.overlapped_cpu_adamw"]
FOUR_STEPS = ["epochs=1", "max_steps_per_epoch=4", "batch_size=4", "gradient_accumulation_steps=2",
              "save_every_n_steps=2", "keep_last_n_checkpoints=null", "log_every_n_steps=1"]


def full_run(out: Path, *overrides: str) -> dict[int, dict]:
    assert main(["run", "full_finetune_single_device", "--config", "tiny/full_cpu", f"output_dir={out}", *FOUR_STEPS,
                 *overrides]) == 0
    return {row["step"]: row for p in sorted((out / "logs").glob("*.jsonl")) for row in map(json.loads, p.open())}


def test_the_recipe_trains_with_it_as_with_torchs_fused_adamw(tmp_path):
    """Accumulation over two micro-batches, no clipping: the same kernel on the same gradients."""
    ours = full_run(tmp_path / "ours", *OVERLAPPED, "clip_grad_norm=null")
    theirs = full_run(tmp_path / "theirs", "+optimizer.fused=True", "clip_grad_norm=null")
    assert [ours[s]["loss"] for s in range(1, 5)] == [theirs[s]["loss"] for s in range(1, 5)]
    assert [ours[s]["grad_norm"] for s in range(1, 5)] == pytest.approx([theirs[s]["grad_norm"] for s in range(1, 5)],
                                                                         rel=1e-6)
    a, b = (load_hf_state_dict(tmp_path / name / "step_4" / "model") for name in ("ours", "theirs"))
    assert all(torch.equal(a[key], b[key]) for key in b)


def test_the_recipe_resumes_from_its_checkpoint_to_the_same_bits(tmp_path):
    """Clipping on, bf16 weights (so the fp32 master weights must come back from the optimizer's
    state); the checkpoint of step 2 alone, copied to a new folder, continues to step 4's bits."""
    uninterrupted = full_run(tmp_path / "uninterrupted", *OVERLAPPED, "dtype=bf16")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "uninterrupted" / "step_2", resumed_dir / "step_2")
    resumed = full_run(resumed_dir, *OVERLAPPED, "dtype=bf16", "resume_from_checkpoint=True")
    assert [resumed[s]["loss"] for s in (3, 4)] == [uninterrupted[s]["loss"] for s in (3, 4)]
    a, b = (load_hf_state_dict(folder / "step_4" / "model") for folder in (resumed_dir, tmp_path / "uninterrupted"))
    assert all(torch.equal(a[key], b[key]) for key in b)
    saved = (torch.load(folder / "step_4" / "recipe_state.pt", weights_only=True)["optimizer"]["state"]
             for folder in (resumed_dir, tmp_path / "uninterrupted"))
    ours, theirs = saved
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in theirs for k in theirs[i])


def test_estimate_states_the_host_memory_it_takes(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model_args(LLAMA3_1_8B)))
    assert main(["estimate", "full_finetune_single_device", "--config", "llama3_1/8B_full_single_device",
                 f"checkpointer.checkpoint_dir={tmp_path}", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    # on the GPU: the fp32 chunk the updated weights pass through (4 x 4M)
    assert "optimizer state          0.02 GiB   AdamW in host memory (overlapped_cpu_adamw)" in out
    assert "host memory for the optimizer: 108.72 GiB" in out  # the config accumulates in bf16
    assert "fp32 master weights (pinned) 29.92 GiB" in out
    assert "gradient accumulator (pinned) 14.96 GiB" in out
    # the device adding: its three chunks on the GPU, no staging ring on the host
    assert main(["estimate", "full_finetune_single_device", "--config", "llama3_1/8B_full_single_device",
                 f"checkpointer.checkpoint_dir={tmp_path}", "--gpu-memory", "24GB",
                 "+optimizer.accumulate_on_device=True"]) == 0
    out = capsys.readouterr().out
    assert "optimizer state          0.05 GiB   AdamW in host memory (overlapped_cpu_adamw)" in out  # (2 x 2 + 4 + 4) x 4M
    assert "host memory for the optimizer: 104.72 GiB" in out and "staging ring" not in out


def test_the_benchmarks_check_trains_as_torch_adamw_either_way(monkeypatch, capsys):
    # What the GPU machine runs first for a new path (its copies on CUDA streams there).
    spec = importlib.util.spec_from_file_location(
        "full_finetune_bench", Path(__file__).parent.parent / "benchmarks" / "full_finetune_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for flag in ([], ["--accumulate-on-device"]):
        monkeypatch.setattr("sys.argv", ["full_finetune_bench.py", "--check", "--device", "cpu", *flag])
        bench.main()
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"accumulate_on_device={bool(flag)}" in line
        assert float(line.rsplit("max_weight_diff=", 1)[1]) < 1e-5


def test_host_memory_that_cannot_be_pinned_is_a_one_line_resource_error(monkeypatch):
    class Cudart:
        def cudaHostRegister(self, pointer: int, size: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
            return 2

    def check_error(status: int) -> None:
        error = torch.cuda.CudaError.__new__(torch.cuda.CudaError)
        RuntimeError.__init__(error, f"out of memory ({status})")
        raise error

    monkeypatch.setattr(torch.cuda, "cudart", Cudart)
    monkeypatch.setattr(torch.cuda, "check_error", check_error)
    with pytest.raises(ResourceError, match=r"could not pin 0\.0 GiB of host memory \(out of memory \(2\)\)\. "
                                            r"Free host memory, or raise the locked-memory limit"):
        offload_optimizer._host_buffer(1024, torch.float32, pinned=True)
