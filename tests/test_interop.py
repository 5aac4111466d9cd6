"""What a run writes loads in peft and transformers and gives our logits."""

from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel

from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing.peft import load_adapter_into
from tunelite.cli.main import main
from tunelite.config import asset_path
from tunelite.errors import CheckpointError
from tunelite.models import lora_llama3_1_tiny
from tunelite.checkpointing.loading import load_checkpoint_into

BASE = Path(asset_path("tiny/model"))
LORA = dict(lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
            lora_rank=16, lora_alpha=32)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=1"]) in (0, None)
    return out / "step_12"


def our_lora_model(adapter_dir: Path) -> torch.nn.Module:
    with torch.device("meta"):
        model = lora_llama3_1_tiny(**LORA)
    load_checkpoint_into(model, HFCheckpointer(str(BASE)), torch.device("cpu"), torch.float32)
    load_adapter_into(model, adapter_dir)
    return model.eval()


def test_adapter_loads_in_peft_with_our_logits(trained_run):
    ours = our_lora_model(trained_run / "adapter")
    base = transformers.LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, trained_run / "adapter").eval()
    tokens = torch.randint(0, 768, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_base = transformers.LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()(tokens).logits
        ours_logits, peft_logits = ours(tokens), theirs(tokens).logits
    assert (ours_logits - ref_base).abs().max() > 1e-2, "the adapter trained to nothing"
    assert (ours_logits - peft_logits).abs().max() <= 1e-4


def test_merged_export_loads_in_transformers_with_our_logits(trained_run):
    ours = our_lora_model(trained_run / "adapter")
    merged = transformers.AutoModelForCausalLM.from_pretrained(trained_run / "model", dtype=torch.float32).eval()
    tokens = torch.randint(0, 768, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - merged(tokens).logits).abs().max() <= 1e-4


def test_adapter_of_another_rank_is_refused_with_the_fix(trained_run):
    with torch.device("meta"):
        model = lora_llama3_1_tiny(**{**LORA, "lora_rank": 8})
    load_checkpoint_into(model, HFCheckpointer(str(BASE)), torch.device("cpu"), torch.float32)
    with pytest.raises(CheckpointError, match="r=16.*lora_rank=8"):
        load_adapter_into(model, trained_run / "adapter")


def test_adapter_for_other_modules_is_refused(trained_run):
    with torch.device("meta"):
        model = lora_llama3_1_tiny(**{**LORA, "apply_lora_to_mlp": False})
    load_checkpoint_into(model, HFCheckpointer(str(BASE)), torch.device("cpu"), torch.float32)
    with pytest.raises(CheckpointError, match="apply_lora_to_mlp"):
        load_adapter_into(model, trained_run / "adapter")
