"""Bad input, one case a row, across the config, the data, the checkpoint, the tokenizer and the
runtime: each stops `tunelite run` with exit code 2 and one line naming the key or the file and
the fix, never a traceback, and leaves nothing behind (no output folder, so no checkpoint). The
cases that need no data or weights read, `tunelite validate` reports the same way."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelite.cli.main import main
from tunelite.config import asset_path


@dataclass(frozen=True)
class Case:
    area: str  # config, data, checkpoint, tokenizer or runtime
    name: str
    overrides: tuple[str, ...]  # "{tmp}" is the test's folder
    expect: tuple[str, ...]  # fragments of the error line
    validate: bool = True  # `tunelite validate` sees it without reading data or weights
    setup: Callable[[Path], None] | None = None
    recipe: str = "lora_finetune_single_device"
    config: str = "tiny/lora_cpu"

    @property
    def id(self) -> str:
        return f"{self.area}-{self.name}"


def model_copy(tmp: Path, config: Callable[[dict], None] | None = None,
               weights: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    """The tiny demo model, copied to tmp/model, its config.json and weights edited as given."""
    folder = tmp / "model"
    shutil.copytree(asset_path("tiny/model"), folder)
    if config is not None:
        hf = json.loads((folder / "config.json").read_text())
        config(hf)
        (folder / "config.json").write_text(json.dumps(hf))
    if weights is not None:
        state = load_file(folder / "model.safetensors")
        weights(state)
        save_file(state, folder / "model.safetensors")
    return folder


def edit(**changes: object) -> Callable[[dict], None]:
    return lambda hf: hf.update(changes)


def drop(key: str) -> Callable[[dict], None]:
    return lambda hf: hf.pop(key)


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def sparse(name: str, size: int) -> Callable[[Path], None]:
    """A file of `size` bytes that takes no disk (and no time) to write."""
    def setup(tmp: Path) -> None:
        with open(tmp / name, "wb") as file:
            file.truncate(size)
    return setup


def adapter(r: object = 8, lora_alpha: object = 16, lora_dropout: object = 0.0) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        folder = tmp / "adapter"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
            "target_modules": ["q_proj", "v_proj"]}))
        save_file({}, folder / "adapter_model.safetensors")
    return setup


def untouched(tmp: Path) -> None:
    pass


MODEL = "checkpointer.checkpoint_dir={tmp}/model"
GENERATE = dict(recipe="generate", config="tiny/generation")
CASES = [
    # Config: a value of the wrong type or out of range, at the top level or a component's argument.
    Case("config", "batch-size-zero", ("batch_size=0",), ("batch_size: 0 is out of range", ">= 1")),
    Case("config", "batch-size-text", ("batch_size=two",), ("batch_size: 'two' is not an int",)),
    Case("config", "epochs-negative", ("epochs=-1",), ("epochs: -1 is out of range",)),
    Case("config", "accumulation-zero", ("gradient_accumulation_steps=0",), ("gradient_accumulation_steps: 0",)),
    Case("config", "steps-per-epoch-zero", ("max_steps_per_epoch=0",), ("max_steps_per_epoch: 0 is out of range",)),
    Case("config", "log-every-zero", ("log_every_n_steps=0",), ("log_every_n_steps: 0 is out of range",)),
    Case("config", "save-every-zero", ("save_every_n_steps=0",), ("save_every_n_steps: 0 is out of range",)),
    Case("config", "keep-last-zero", ("keep_last_n_checkpoints=0",), ("keep_last_n_checkpoints: 0 is out of range",)),
    Case("config", "clip-negative", ("clip_grad_norm=-1.0",), ("clip_grad_norm: -1.0 is out of range", "> 0")),
    Case("config", "skip-negative", ("+skip_nonfinite_steps=-1",), ("skip_nonfinite_steps: -1 is out of range",)),
    Case("config", "seed-float", ("seed=1.5",), ("seed: 1.5 is not an int",)),
    Case("config", "shuffle-word", ("shuffle=maybe",), ("shuffle: 'maybe' is not true or false",)),
    Case("config", "dtype-fp16", ("dtype=fp16",), ("dtype: 'fp16' is not one of 'bf16', 'fp32'",)),
    Case("config", "device-unknown", ("device=gpu",), ("device: 'gpu' is not valid", "cuda:N")),
    Case("config", "rank-negative", ("model.lora_rank=-1",), ("model.lora_rank: -1 is out of range",)),
    Case("config", "rank-huge", ("model.lora_rank=1000000000",), ("model.lora_rank: 1000000000 is out of range",)),
    Case("config", "rank-text", ("model.lora_rank=eight",), ("model.lora_rank: 'eight' is not an int",)),
    Case("config", "alpha-nan", ("model.lora_alpha=.nan",), ("model.lora_alpha: nan is out of range",)),
    Case("config", "dropout-one", ("model.lora_dropout=1.0",), ("model.lora_dropout: 1.0 is out of range",)),
    Case("config", "mlp-flag-number", ("model.apply_lora_to_mlp=3",),
         ("model.apply_lora_to_mlp: 3 is not true or false",)),
    Case("config", "modules-not-a-list", ("model.lora_attn_modules=q_proj",),
         ("model.lora_attn_modules: 'q_proj' is not a list of strings",)),
    Case("config", "lr-negative", ("optimizer.lr=-0.001",), ("optimizer.lr: -0.001 is out of range",)),
    Case("config", "betas-above-one", ("+optimizer.betas=[0.9,1.5]",),
         ("optimizer.betas: [0.9, 1.5] is out of range",)),
    Case("config", "weight-decay-text", ("optimizer.weight_decay=lots",), ("optimizer.weight_decay: 'lots' is not",)),
    Case("config", "chunks-zero", ("loss.num_chunks=0",), ("loss.num_chunks: 0 is out of range",)),
    Case("config", "warmup-negative", ("lr_scheduler.num_warmup_steps=-5",), ("lr_scheduler.num_warmup_steps: -5",)),
    Case("config", "seq-len-zero", ("tokenizer.max_seq_len=0",), ("tokenizer.max_seq_len: 0 is out of range",)),
    Case("config", "val-fraction-one", ("+dataset.val_fraction=1.0",), ("dataset.val_fraction: 1.0 is out of range",)),
    Case("config", "misspelt-argument", ("+model.lora_rnak=4",),
         ("model.lora_rnak: not a parameter of tunelite.models.lora_llama3_1_tiny", "did you mean model.lora_rank?")),
    Case("config", "misspelt-key", ("+batch_sise=4",), ("batch_sise: not read by lora_finetune_single_device",)),
    Case("config", "misspelt-component", ("optimizer._component_=torch.optim.AdamWW",),
         ("did you mean torch.optim.AdamW?",)),
    Case("config", "untrusted-component", ("loss._component_=os.system",),
         ("loss._component_: os.system", "--trust os")),
    Case("config", "unset-environment-variable", ("dataset.source=${{oc.env:TUNELITE_NO_SUCH_VARIABLE}}",),
         ("dataset.source:", "TUNELITE_NO_SUCH_VARIABLE")),
    Case("config", "missing-required", ("~seed",), ("seed: required by lora_finetune_single_device",)),
    Case("config", "top-k-zero", ("top_k=0", "prompt=hi"), ("top_k: 0 is out of range",), **GENERATE),
    # Checkpoint: the folders the config names.
    Case("checkpoint", "folder-missing", ("checkpointer.checkpoint_dir={tmp}/nowhere",),
         ("checkpointer.checkpoint_dir: {tmp}/nowhere is not a folder",)),
    Case("checkpoint", "no-config-json", (MODEL,), ("{tmp}/model holds no config.json",),
         setup=lambda tmp: (model_copy(tmp) / "config.json").unlink()),
    Case("checkpoint", "pickled-weights-only", (MODEL,), ("holds no .safetensors weights", "never unpickles"),
         setup=lambda tmp: (model_copy(tmp) / "model.safetensors").rename(tmp / "model" / "pytorch_model.bin")),
    Case("checkpoint", "resume-folder-missing", ("resume_from_checkpoint={tmp}/out/step_3",),
         ("resume_from_checkpoint: {tmp}/out/step_3 is not a folder",)),
    Case("checkpoint", "adapter-folder-missing", ("adapter_dir={tmp}/nowhere", "prompt=hi"),
         ("adapter_dir: {tmp}/nowhere is not a peft adapter folder",), **GENERATE),
    # Checkpoint: config.json against the model, and weights against config.json.
    Case("checkpoint", "other-size", (MODEL,),
         ("does not match {tmp}/model/config.json", "num_layers: model 2 vs checkpoint 3"),
         setup=lambda tmp: model_copy(tmp, edit(num_hidden_layers=3))),
    Case("checkpoint", "other-family", (MODEL,), ("{tmp}/model/config.json", "'qwen2'"),
         setup=lambda tmp: model_copy(tmp, edit(model_type="qwen2", architectures=["Qwen2ForCausalLM"]))),
    Case("checkpoint", "config-json-damaged", (MODEL,), ("{tmp}/model/config.json is not valid JSON",),
         setup=lambda tmp: (model_copy(tmp) / "config.json").write_text('{"vocab_size": 7')),
    Case("checkpoint", "config-json-lacks-sizes", (MODEL,), ("{tmp}/model/config.json", "hidden_size"),
         setup=lambda tmp: model_copy(tmp, drop("hidden_size"))),
    Case("checkpoint", "config-json-huge", (MODEL,), ("{tmp}/model/config.json is 20.0 MiB, over the 16.0 MiB",),
         setup=lambda tmp: (model_copy(tmp), sparse("model/config.json", 20 * 2**20)(tmp))),
    Case("checkpoint", "weights-of-other-shapes", (MODEL,),
         ("{tmp}/model: weights do not fit the model", "norm.weight is (64,), the model's (128,)"), validate=False,
         setup=lambda tmp: model_copy(tmp, weights=lambda w: w.update({"model.norm.weight": torch.ones(64)}))),
    Case("checkpoint", "weights-truncated", (MODEL,), ("{tmp}/model/model.safetensors cannot be read as safetensors",),
         validate=False, setup=lambda tmp: write("model/model.safetensors", b"\x08\x00")(model_copy(tmp).parent)),
    Case("checkpoint", "adapter-rank-negative", ("adapter_dir={tmp}/adapter", "prompt=hi"),
         ("{tmp}/adapter/adapter_config.json: r: -1 is out of range",),
         validate=False, setup=adapter(r=-1), **GENERATE),
    Case("checkpoint", "adapter-rank-huge", ("adapter_dir={tmp}/adapter", "prompt=hi"),
         ("adapter_config.json: r: 1000000000 is out of range",), validate=False, setup=adapter(r=10**9), **GENERATE),
    Case("checkpoint", "adapter-rank-float", ("adapter_dir={tmp}/adapter", "prompt=hi"),
         ("adapter_config.json: r: 1000000000.0 is not an int",), validate=False, setup=adapter(r=1e9), **GENERATE),
    Case("checkpoint", "adapter-alpha-nan", ("adapter_dir={tmp}/adapter", "prompt=hi"),
         ("adapter_config.json: lora_alpha: nan is out of range",),
         validate=False, setup=adapter(lora_alpha=float("nan")), **GENERATE),
    # Tokenizer files.
    Case("tokenizer", "missing", ("tokenizer.path={tmp}/tokenizer.model",),
         ("tokenizer.path: {tmp}/tokenizer.model does not exist",)),
    Case("tokenizer", "a-tokenizer-json", ("tokenizer.path={tmp}/tokenizer.model",),
         ("looks like a Hugging Face tokenizer.json",),
         validate=False, setup=write("tokenizer.model", '{"version": "1.0", "model": {}}\n')),
    Case("tokenizer", "huge", ("tokenizer.path={tmp}/tokenizer.model",),
         ("{tmp}/tokenizer.model is 300.0 MiB, over the 256.0 MiB",), validate=False,
         setup=sparse("tokenizer.model", 300 * 2**20)),
    Case("tokenizer", "endless-line", ("tokenizer.path={tmp}/tokenizer.model",),
         ("{tmp}/tokenizer.model: line 2 is longer",),
         validate=False, setup=write("tokenizer.model", b"IQ== 0\n" + b"A" * 2**20 + b"\n")),
    # Data.
    Case("data", "source-missing", ("dataset.source={tmp}/data.json",),
         ("dataset source {tmp}/data.json does not exist",)),
    Case("data", "glob-matches-nothing", ("dataset.source={tmp}/*.jsonl",),
         ("dataset source {tmp}/*.jsonl matches no files",)),
    Case("data", "row-lacks-a-column", ("dataset.source={tmp}/data.jsonl",), ("{tmp}/data.jsonl, line 2", "'output'"),
         validate=False,
         setup=write("data.jsonl", '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c"}\n')),
    Case("data", "not-json", ("dataset.source={tmp}/data.json",), ("{tmp}/data.json",), validate=False,
         setup=write("data.json", "[{\"instruction\": ")),
    Case("data", "empty", ("dataset.source={tmp}/data.jsonl",), ("{tmp}/data.jsonl is empty",), validate=False,
         setup=write("data.jsonl", "")),
    # Runtime: what only the machine can say.
    Case("runtime", "output-dir-under-a-file", ("output_dir={tmp}/a_file/out",),
         ("output_dir: cannot create {tmp}/a_file/out: {tmp}/a_file is a file",), setup=write("a_file", "x")),
    Case("runtime", "no-gpu", ("device=cuda",),
         ("device: 'cuda' asked for, but torch sees no CUDA GPU",), validate=False),
]


def run_args(case: Case, tmp: Path) -> list[str]:
    overrides = [override.format(tmp=tmp) for override in case.overrides]
    out = [] if case.recipe == "generate" else [f"output_dir={tmp / 'out'}"]
    return ["--config", case.config, *out, *overrides]


def test_the_table_covers_every_area_with_forty_cases_or_more():
    assert len(CASES) >= 40
    assert {case.area for case in CASES} == {"config", "data", "checkpoint", "tokenizer", "runtime"}
    assert len({case.id for case in CASES}) == len(CASES)


# The no-gpu case needs a machine without one, as CI's; elsewhere it cannot happen.
@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.skipif(case.name == "no-gpu" and torch.cuda.is_available(),
                                                 reason="this machine has a GPU"))
    for case in CASES], ids=lambda case: case.id)
def test_bad_input_stops_the_run_with_one_line_naming_it_and_writes_nothing(case, tmp_path, capsys):
    (case.setup or untouched)(tmp_path)
    assert main(["run", case.recipe, *run_args(case, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for fragment in case.expect:
        assert fragment.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists(), "a refused run left an output folder"
    if case.validate:
        assert main(["validate", case.recipe, *run_args(case, tmp_path)]) == 2
        err = capsys.readouterr().err
        assert all(fragment.format(tmp=tmp_path) in err for fragment in case.expect), err


# In a fresh interpreter: the peak memory before and after reading the tokenizer file named.
PEAK_PROBE = """\
import resource, sys
from tunelite.errors import ConfigError
from tunelite.tokenizers import load_bpe_ranks
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_bpe_ranks(sys.argv[1])
except ConfigError as error:
    print(error)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_long_tokenizer_line_is_refused_from_its_first_kilobytes_not_read_whole(tmp_path):
    """A 200 MiB line (under the file-size cap) costs a few kilobytes to refuse, not 200 MiB and its copies."""
    sparse("tokenizer.model", 200 * 2**20)(tmp_path)
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(tmp_path / "tokenizer.model")],
                          capture_output=True, text=True, check=True)
    message, peaks = done.stdout.strip().splitlines()
    assert "line 1 is longer than 4096 bytes" in message
    before, after = map(int, peaks.split())  # KiB
    assert after - before < 32 * 2**10
