"""The recipes end to end on the embedded tiny model, as a user runs them."""

import json
from pathlib import Path

import pytest
import torch

from tunelite.checkpointing.hf import load_hf_state_dict
from tunelite.checkpointing.peft import load_peft_adapter
from tunelite.cli.main import main
from tunelite.config import asset_path, load_config, validate_config
from tunelite.modules.lora import merge_lora_state_dict
from tunelite.recipe_registry import RECIPES, configs_dir, read_declarations


SHIPPED = sorted(str(p.relative_to(configs_dir()).with_suffix("")) for p in configs_dir().rglob("*.yaml"))


@pytest.mark.parametrize("recipe, name", [(r, c) for r in RECIPES for c in r.configs])
def test_every_shipped_config_validates_against_its_recipes_keys(recipe, name):
    validate_config(load_config(configs_dir() / f"{name}.yaml"), read_declarations(recipe.path).keys)


def test_every_shipped_config_is_listed_under_a_recipe():
    assert sorted(c for r in RECIPES for c in r.configs) == SHIPPED


def test_validate_names_the_key_path_of_a_typo(tmp_path, capsys):
    text = (configs_dir() / "tiny/lora_cpu.yaml").read_text().replace("lora_rank:", "lora_rnak:")
    (tmp_path / "typo.yaml").write_text(text)
    assert main(["validate", str(tmp_path / "typo.yaml")]) != 0
    assert "model.lora_rnak" in capsys.readouterr().err


def test_tiny_lora_demo_learns_and_writes_loadable_outputs(tmp_path):
    out = tmp_path / "run"
    code = main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}",
                 "epochs=2", "log_every_n_steps=1", "+base_model_id=meta-llama/Llama-3.1-8B-Instruct"])
    assert code in (0, None)
    rows = [json.loads(line) for line in next((out / "logs").glob("*.jsonl")).read_text().splitlines()]
    assert len(rows) == 24  # 100 samples // batch 8 = 12 steps, 2 epochs
    assert sum(r["loss"] for r in rows[-4:]) / 4 < rows[0]["loss"] - 1.0

    final = out / "step_24"
    adapter, adapter_config = load_peft_adapter(final / "adapter")
    assert adapter_config["base_model_name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"  # for peft, once shared
    assert adapter_config["r"] == 16 and adapter_config["target_modules"] == [
        "down_proj", "gate_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith("lora_b"))
    base = load_hf_state_dict(Path(asset_path("tiny/model")))
    expected = merge_lora_state_dict({**base, **adapter}, rank=16, alpha=32)
    written = load_hf_state_dict(final / "model")
    assert written.keys() == expected.keys()
    for key in expected:
        assert torch.equal(written[key], expected[key]), key
    assert (final / "model" / "config.json").read_text() == (Path(asset_path("tiny/model")) / "config.json").read_text()


def test_validation_loss_is_reported_every_n_steps_and_at_the_end(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}", "epochs=2",
                 "+dataset.val_fraction=0.2", "+eval_every_n_steps=4", "save_merged_model=False"]) in (0, None)
    rows = [json.loads(line) for line in next((out / "logs").glob("*.jsonl")).read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    # 80 training rows // batch 8 = 10 steps an epoch, 20 in all.
    assert [step for step, _ in val] == [4, 8, 12, 16, 20]
    assert val[-1][1] < val[0][1]
