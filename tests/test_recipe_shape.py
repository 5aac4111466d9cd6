"""A recipe is a loop a user reads and changes: its keys are declared and checked, a copy runs as
the original does, and the library's rooms import downward only."""

import ast
import json
from pathlib import Path

import pytest

from tunelite.cli.main import main
from tunelite.recipe_registry import RECIPES, read_declarations

TUNELITE = Path(__file__).resolve().parent.parent / "tunelite"
# Rooms from the top down (DESIGN.md): a module may import its own room and the rooms below it only.
LEVEL = {"cli": 0, "recipes": 1, "training": 2, "generation": 2, "serving": 2, "hub": 2, "export": 2,
         "distributed": 3, "checkpointing": 4, "data": 4, "tokenizers": 4, "models": 4, "modules": 5, "runtime": 6,
         "config": 7, "recipe_registry": 7, "errors": 8, "files": 8, "assets": 8}


def keys_read(script: Path) -> set[str]:
    """Top-level config keys a recipe reads: `cfg.key`, `cfg.get("key")`, `cfg["key"]`."""
    read = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg" \
                and node.attr != "get":
            read.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "cfg":
            read.add(node.args[0].value)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
            read.add(node.slice.value)
    return read


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_each_recipe_declares_exactly_the_config_keys_it_reads(recipe):
    declared = read_declarations(recipe.path).keys
    assert set(declared.all) == keys_read(recipe.path)
    assert len(declared.all) == len(set(declared.all))


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name != "generate"], ids=lambda r: r.name)
def test_each_training_recipe_writes_its_loop_out(recipe):
    """The loop's parts are in the recipe's own text, not behind a trainer object."""
    text = recipe.path.read_text()
    for part in ("for epoch in range(", ".backward()", "optimizer.step()", "scheduler.step()", "reporter.report(",
                 "save_checkpoint(", "stop.requested()", "optimizer.zero_grad("):
        assert part in text, f"{recipe.name} does not write `{part}` out"
    # the check that keeps a bad step from the weights: read back, or decided on the device
    assert "is_finite(" in text or "bad_step(" in text, f"{recipe.name} does not write its non-finite check out"
    assert 120 <= len(text.splitlines()) <= 260


@pytest.mark.parametrize("key", ["+dpo_beta=0.1", "+fsdp_cpu_offload=True", "+num_workers=2",
                                 "+log_dir=/tmp/x", "+save_adapter_weights_only=True"])
def test_a_key_its_recipe_does_not_read_is_refused_with_its_path(key, capsys):
    assert main(["validate", "tiny/lora_cpu", key]) == 2
    name = key.lstrip("+").partition("=")[0]
    assert f"{name}: not read by lora_finetune_single_device" in capsys.readouterr().err


def test_the_dpo_recipe_accepts_its_own_keys_and_refuses_sft_only_ones(capsys):
    assert main(["validate", "tiny/lora_dpo_cpu", "+log_prob_chunks=4"]) == 0
    assert main(["validate", "tiny/lora_cpu", "+log_prob_chunks=4"]) == 2
    assert "log_prob_chunks: not read by lora_finetune_single_device" in capsys.readouterr().err


L2_LINES = '''
                    penalty = cfg.adapter_l2 * sum(p.pow(2).sum() for p in adapters) / accumulation
                    loss = loss + penalty
'''


def test_a_copied_recipe_with_an_l2_penalty_on_the_adapters_runs_and_logs_it(tmp_path, capsys):
    """The copy-edit-run path: the penalty is added in the copy only, no library file is touched."""
    script = tmp_path / "my_recipe.py"
    assert main(["cp", "lora_finetune_single_device", str(script)]) == 0
    text = script.read_text()
    anchor = "                    loss = loss_fn(hidden, batch[\"labels\"], model.output) * share\n"
    assert anchor in text
    text = text.replace(anchor, anchor + L2_LINES.lstrip("\n"))
    text = text.replace('"resume_from_checkpoint", "log_peak_memory_stats",',
                        '"resume_from_checkpoint", "log_peak_memory_stats", "adapter_l2",')
    script.write_text(text)
    common = ["--config", "tiny/lora_cpu", "epochs=1", "max_steps_per_epoch=3", "log_every_n_steps=1",
              "save_merged_model=False"]
    assert main(["validate", str(script), "--config", "tiny/lora_cpu", "+adapter_l2=0.5"]) == 0
    assert main(["validate", "tiny/lora_cpu", "+adapter_l2=0.5"]) == 2  # the built-in recipe does not read it
    assert main(["run", "lora_finetune_single_device", *common, f"output_dir={tmp_path / 'plain'}"]) == 0
    assert main(["run", str(script), *common, f"output_dir={tmp_path / 'l2'}", "+adapter_l2=0.5"]) == 0
    plain, l2 = ([json.loads(line) for line in next((tmp_path / name / "logs").glob("*.jsonl")).read_text().splitlines()]
                 for name in ("plain", "l2"))
    # Step 1 sees the same data and initial adapters: the difference is the penalty, 0.5 x |A|^2 (B starts at 0).
    assert l2[0]["loss"] - plain[0]["loss"] > 1.0
    assert l2[0]["grad_norm"] != plain[0]["grad_norm"]
    assert main(["estimate", str(script), "--config", "tiny/lora_cpu", "+adapter_l2=0.5", "--gpu-memory", "1GB"]) == 0


def imports_of(path: Path) -> list[tuple[str, int]]:
    """The tunelite rooms a module imports, with line numbers (imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelite"):
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
            found += [(name, node.lineno) for name in names]
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], node.lineno) for alias in node.names
                      if alias.name.startswith("tunelite.")]
    return found


def test_rooms_import_downward_only():
    upward = []
    for path in sorted(TUNELITE.rglob("*.py")):
        relative = path.relative_to(TUNELITE)
        room = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        if room == "__init__":
            continue
        for imported, line in imports_of(path):
            if imported in LEVEL and room in LEVEL and LEVEL[imported] < LEVEL[room]:
                upward.append(f"{relative}:{line} ({room}) imports {imported}")
    assert upward == []
