"""The full, LoRA and QLoRA recipes on the tiny model, and the pieces that make 8B fit a GPU."""

import glob
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tunelite.checkpointing.hf import HFCheckpointer, load_hf_state_dict
from tunelite.cli.main import main
from tunelite.config import asset_path
from tunelite.models import qlora_llama3_1_tiny
from tunelite.modules.lora import set_trainable_params
from tunelite.modules.nf4 import NF4Tensor
from tunelite.recipe_registry import configs_dir
from tunelite.training.oom import oom_advice
from tunelite.training.reporting import StepReporter
from tunelite.training.metric_logging import DiskLogger, MetricLoggers
from tunelite.checkpointing.loading import load_checkpoint_into

ROW = {"instruction": "Say hello in French.", "input": "", "output": "Bonjour !"}


def run_recipe(recipe: str, config: str, out: Path, *overrides: str) -> list[dict]:
    assert main(["run", recipe, "--config", config, f"output_dir={out}", "log_every_n_steps=1", *overrides]) in (0, None)
    return [json.loads(line) for p in sorted((out / "logs").glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture
def repeated_batch(tmp_path) -> str:
    path = tmp_path / "same.json"
    path.write_text(json.dumps([ROW] * 8))
    return str(path)


@pytest.mark.parametrize("recipe, config", [
    ("lora_finetune_single_device", "tiny/lora_cpu"),
    ("lora_finetune_single_device", "tiny/qlora_cpu"),
    ("full_finetune_single_device", "tiny/full_cpu"),
])
def test_each_recipe_lowers_the_loss_on_a_repeated_batch(tmp_path, repeated_batch, recipe, config):
    rows = run_recipe(recipe, config, tmp_path / "out", f"dataset.source={repeated_batch}", "epochs=3",
                      "lr_scheduler.num_warmup_steps=0", "save_merged_model=False" if "lora" in recipe else "seed=0")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]


def test_qlora_base_weights_are_nf4_and_get_no_gradient():
    with torch.device("meta"):
        model = qlora_llama3_1_tiny(["q_proj", "v_proj"], apply_lora_to_mlp=True)
    load_checkpoint_into(model, HFCheckpointer(asset_path("tiny/model")), torch.device("cpu"), torch.float32)
    set_trainable_params(model)
    model(torch.randint(0, 768, (2, 16))).float().pow(2).mean().backward()
    for layer in model.layers:
        for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.output_proj,
                     layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):
            assert isinstance(proj.weight, NF4Tensor) and proj.weight.grad is None
        assert layer.attn.q_proj.lora_a.grad is not None and layer.attn.q_proj.lora_b.grad is not None
    assert not isinstance(model.output.weight, NF4Tensor)


def test_optimizer_in_backward_gives_the_plain_loops_weights(tmp_path):
    common = ["max_steps_per_epoch=2", "epochs=1", "clip_grad_norm=null"]
    run_recipe("full_finetune_single_device", "tiny/full_cpu", tmp_path / "plain", *common)
    run_recipe("full_finetune_single_device", "tiny/full_cpu", tmp_path / "inbwd", *common, "optimizer_in_bwd=True")
    plain, inbwd = (load_hf_state_dict(tmp_path / name / "step_2" / "model") for name in ("plain", "inbwd"))
    base = load_hf_state_dict(Path(asset_path("tiny/model")))
    assert not torch.equal(plain["layers.0.attn.q_proj.weight"], base["layers.0.attn.q_proj.weight"])
    for key in plain:
        torch.testing.assert_close(inbwd[key], plain[key], rtol=1e-6, atol=1e-7)


def test_optimizer_in_backward_refuses_clipping_with_the_fix(tmp_path, capsys):
    assert main(["run", "full_finetune_single_device", "--config", "tiny/full_cpu", f"output_dir={tmp_path}",
                 "optimizer_in_bwd=True"]) == 2
    assert "clip_grad_norm: null" in capsys.readouterr().err


def read_wandb_history(path: str) -> list[dict]:
    """The history rows of an offline run file (a LevelDB-style log of wandb's protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, rows, pos, pending = Path(path).read_bytes(), [], 7, b""
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        if space < 7:
            pos += space
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending += chunk
        if kind in (1, 4) and pending:  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_logged_loss_and_lr(tmp_path):
    # As a user runs it, in its own process: wandb's offline writer completes its file by process exit.
    cfg = OmegaConf.load(configs_dir() / "tiny" / "lora_cpu.yaml")
    cfg.metric_logger = [{"_component_": "tunelite.training.metric_logging.WandBLogger", "project": "tunelite-test",
                          "name": "tiny", "tags": ["ci"], "log_dir": str(tmp_path / "wandb")}]
    OmegaConf.save(cfg, tmp_path / "wandb.yaml")
    subprocess.run([sys.executable, "-m", "tunelite.cli.main", "run", "lora_finetune_single_device", "--config",
                    str(tmp_path / "wandb.yaml"), f"output_dir={tmp_path / 'out'}", "epochs=1", "log_every_n_steps=4",
                    "save_merged_model=False"], check=True, capture_output=True,
                   env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    run_files = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(run_files) == 1
    rows = [r for r in read_wandb_history(run_files[0]) if "loss" in r]
    assert [r["_step"] for r in rows] == [4, 8, 12]
    assert rows[0]["loss"] > rows[-1]["loss"] > 0
    assert rows[0]["lr"] > rows[1]["lr"] > rows[2]["lr"] == 0.0  # the cosine schedule's end


def test_profiler_switch_writes_a_trace(tmp_path):
    run_recipe("lora_finetune_single_device", "tiny/lora_cpu", tmp_path / "out", "epochs=1", "save_merged_model=False",
               f"+profiler={{_component_: tunelite.training.profiling.build_profiler, enabled: true, "
               f"output_dir: {tmp_path / 'trace'}, wait: 1, warmup: 1, active: 2}}")
    traces = list((tmp_path / "trace").glob("*.json"))
    assert len(traces) == 1 and "traceEvents" in traces[0].read_text()


def test_tokens_per_s_counts_the_wait_for_the_device(tmp_path):
    """On a GPU the step's kernels are only queued when the loop reaches the report; reading the
    loss waits for them. A step timed before that read over-reports tokens/s (by ~20% under compile)."""

    class QueuedLoss:
        def item(self) -> float:
            time.sleep(0.2)  # the GPU finishing the step
            return 1.0

    with StepReporter(MetricLoggers([DiskLogger(str(tmp_path), "m.jsonl")]), 1, 0, torch.device("cpu"), 1, False) as reporter:
        reporter.report(1, 0, QueuedLoss(), 1e-3, 1000, time.perf_counter(), None)
    (row,) = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert row["tokens_per_s"] <= 1000 / 0.2


def test_out_of_memory_advice_names_what_to_change():
    message = str(oom_advice(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 4, 2, False))
    assert "batch_size=2 gradient_accumulation_steps=4" in message
    assert "enable_activation_checkpointing=True" in message and "Tried to allocate 2 GiB" in message
