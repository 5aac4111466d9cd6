"""`tunelite merge`: an adapter folded into a sharded base, streamed, loads in transformers like
base + adapter in peft; adapters made for another base are refused; host memory stays small."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import TINY, write_hf_checkpoint
from test_generation import _lora_model_with_trained_adapter
from tunelite.checkpointing.atomic import verify_folder
from tunelite.checkpointing.hf import INDEX_FILE, load_hf_state_dict
from tunelite.checkpointing.merge import MERGE_RECORD, merge_adapter
from tunelite.checkpointing.peft import base_model_name, save_peft_adapter
from tunelite.checkpointing.streamed import list_tensors, write_safetensors
from tunelite.cli.main import main
from tunelite.errors import CheckpointError
from tunelite.models.llama import LoRAArgs, lora_llama
from tunelite.modules.lora import merged_state_dict


@pytest.fixture
def sharded_run(tmp_path) -> tuple[Path, Path, torch.nn.Module]:
    """A base in three shards and the adapter of a middle step of a run on it."""
    base = tmp_path / "base"
    write_hf_checkpoint(base, shards=3)
    (base / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    trained = _lora_model_with_trained_adapter(base)
    adapter = tmp_path / "run" / "step_2" / "adapter"
    save_peft_adapter(trained, adapter, base_model_name_or_path=str(base))
    return base, adapter, trained


def test_merged_middle_step_loads_in_transformers_with_the_logits_of_base_plus_adapter_in_peft(sharded_run, tmp_path):
    base, adapter, _ = sharded_run
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output-dir", str(tmp_path / "merged")]) == 0

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_logits, peft_logits = merged(tokens).logits, peft(tokens).logits
        assert (merged_logits - plain(tokens).logits).abs().max() > 1e-2, "the adapter changed nothing"
    assert (merged_logits - peft_logits).abs().max() <= 1e-4


def test_merge_keeps_the_bases_shards_index_and_side_files_and_equals_the_in_memory_merge(sharded_run, tmp_path):
    base, adapter, trained = sharded_run
    out = tmp_path / "merged"
    summary = merge_adapter(base, adapter, out)
    assert (summary.files, summary.adapted) == (3, 2 * 6 + 1)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    index, base_index = (json.loads((d / INDEX_FILE).read_text()) for d in (out, base))
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(p.stat().st_size - 8 - _header_size(p) for p in out.glob("*.safetensors"))
    assert (out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()
    assert json.loads((out / MERGE_RECORD).read_text())["base_model"] == str(base)
    verify_folder(out)  # written through atomic_folder: manifest present and right

    expected = merged_state_dict(trained)
    written = load_hf_state_dict(out)
    assert written.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], rtol=0, atol=1e-6)


def _header_size(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_merge_to_bf16_stores_bf16_and_says_so_in_config(sharded_run, tmp_path):
    base, adapter, _ = sharded_run
    merge_adapter(base, adapter, tmp_path / "merged", torch.bfloat16)
    assert {e.dtype for p in (tmp_path / "merged").glob("*.safetensors") for e in list_tensors(p)} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_adapter_made_for_another_base_is_refused_naming_the_adapter_file(tmp_path, sharded_run):
    base, _, _ = sharded_run
    other = dataclasses.replace(TINY, embed_dim=96, num_heads=6, num_kv_heads=2)
    save_peft_adapter(lora_llama(other, LoRAArgs(("q_proj", "v_proj"))), tmp_path / "other", "org/other-model")
    with pytest.raises(CheckpointError, match=r"other/adapter_model.safetensors: .*another base model \(org/other-model\)"):
        merge_adapter(base, tmp_path / "other", tmp_path / "merged")
    deeper = dataclasses.replace(TINY, num_layers=3)
    save_peft_adapter(lora_llama(deeper, LoRAArgs(("q_proj",))), tmp_path / "deeper", "org/deeper")
    with pytest.raises(CheckpointError, match=r"deeper/adapter_model.safetensors: adapters on \['layers.2"):
        merge_adapter(base, tmp_path / "deeper", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_whose_rank_disagrees_with_its_config_is_refused(sharded_run, tmp_path):
    base, adapter, _ = sharded_run
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError, match="adapter_config.json says r=8"):
        merge_adapter(base, adapter, tmp_path / "merged")


def test_merge_never_writes_into_an_existing_folder(sharded_run, tmp_path, capsys):
    base, adapter, _ = sharded_run
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--output-dir", str(base)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert len(list(base.glob("*.safetensors"))) == 3


def test_base_model_name_prefers_the_config_then_the_download_record_then_the_path(tmp_path):
    assert base_model_name(tmp_path) == str(tmp_path)
    (tmp_path / "tunelite_source.json").write_text('{"repo_id": "meta-llama/Llama-3.1-8B", "revision": "abc"}')
    assert base_model_name(tmp_path) == "meta-llama/Llama-3.1-8B"
    assert base_model_name(tmp_path, base_model_id="me/my-base") == "me/my-base"
    (tmp_path / "tunelite_source.json").write_text('{"revision": "abc"}')
    with pytest.raises(CheckpointError, match="tunelite_source.json: repo_id"):
        base_model_name(tmp_path)


def test_streamed_writer_writes_what_safetensors_reads(tmp_path):
    tensors = {"a": torch.randn(5, 3), "b": torch.arange(7), "c": torch.randn(4, 2).to(torch.bfloat16)}
    header = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", header, ([t[:2], t[2:]] for t in tensors.values()), {"format": "pt"})
    from safetensors.torch import load_file

    read = load_file(tmp_path / "x.safetensors")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)


# Peak resident memory of this process since exec (VmHWM; ru_maxrss would include the parent's
# memory at fork).
PEAK = "print(int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]) * 1024)"
IDLE = "import sys\nfrom pathlib import Path\nimport torch\nimport tunelite.checkpointing.merge\nfrom tunelite.cli.main import main\n"
MERGE = IDLE + "main(['merge', '--base', sys.argv[1], '--adapter', sys.argv[2], '--output-dir', sys.argv[3]])\n"


def test_a_sharded_merge_holds_far_less_than_one_shard_in_host_memory(tmp_path):
    """Three ~130 MiB shards of 4 MiB tensors, every linear weight adapted: `tunelite merge`'s peak
    memory over an idle interpreter's stays below one shard (it holds about one block at a time)."""
    args = dataclasses.replace(TINY, num_layers=24, embed_dim=512, num_heads=8, num_kv_heads=8,
                               intermediate_dim=2048, vocab_size=2048)
    base = tmp_path / "base"
    base.mkdir()
    lora_args = LoRAArgs(("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, lora_rank=8)
    with torch.device("meta"):
        model = lora_llama(args, lora_args)
    state = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}
    _write_shards(base, args, {k: v for k, v in state.items() if not k.endswith(("lora_a", "lora_b"))}, 3)
    model.load_state_dict(state, assign=True)
    save_peft_adapter(model, tmp_path / "adapter", str(base))
    largest_shard = max(p.stat().st_size for p in base.glob("*.safetensors"))

    def peak(*argv: str) -> int:
        out = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True).stdout
        return int(out.split()[-1])

    idle = peak("-c", IDLE + PEAK)
    merging = peak("-c", MERGE + PEAK, str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert largest_shard > 120 * 2**20
    assert merging - idle < largest_shard, (merging - idle, largest_shard)


def _write_shards(folder: Path, args, state: dict[str, torch.Tensor], shards: int) -> None:
    from tunelite.checkpointing.hf import ADAPTERS, hf_config_from_model_args, save_hf_state_dict

    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {ADAPTERS[args.model_type].to_hf(k): f"model-{i // per + 1:05d}-of-{shards:05d}.safetensors"
                  for i, k in enumerate(keys)}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_hf_state_dict(state, folder, source_dir=folder, dtype=torch.float32, model_type=args.model_type)
    (folder / "config.json").write_text(json.dumps(hf_config_from_model_args(args, torch.float32)))


@pytest.mark.parametrize("command", ["merge", "serve", "upload", "export"])
def test_shipping_subcommands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: tunelite {command}" in capsys.readouterr().out
