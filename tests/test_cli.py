"""The `tunelite` command: ls, cp, run and validate, called through `main([...])`."""

import subprocess
import sys
from pathlib import Path

import pytest

from tunelite import recipe_registry
from tunelite.cli.main import main
from tunelite.recipe_registry import Recipe

GOOD_CONFIG = """\
output_dir: {output_dir}
batch_size: 2
optimizer:
  _component_: torch.optim.AdamW
  lr: 1e-3
loss:
  _component_: torch.nn.CrossEntropyLoss
"""

# A recipe in miniature: parses its command line like every recipe and writes what it received.
RECIPE_SCRIPT = """\
from pathlib import Path

from omegaconf import OmegaConf

from tunelite.config import recipe_entry

CONFIG_KEYS = {"required": ("output_dir", "batch_size", "optimizer", "loss"), "optional": ("seed",)}


def main(cfg):
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.output_dir) / "received.yaml")


if __name__ == "__main__":
    recipe_entry(main)
"""


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_CONFIG.format(output_dir=tmp_path / "out"))
    return path


@pytest.fixture
def recipe_script(tmp_path: Path) -> Path:
    path = tmp_path / "my_recipe.py"
    path.write_text(RECIPE_SCRIPT)
    return path


@pytest.fixture
def fake_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry of one recipe and one config in tmp_path, so cp does not depend on shipped files."""
    configs = tmp_path / "builtin_configs"
    (configs / "demo").mkdir(parents=True)
    (configs / "demo" / "tiny.yaml").write_text("batch_size: 1\n")
    recipes = tmp_path / "builtin_recipes"
    recipes.mkdir()
    (recipes / "demo_recipe.py").write_text("print('demo')\n")
    monkeypatch.setattr(recipe_registry, "configs_dir", lambda: configs)
    monkeypatch.setattr(recipe_registry, "recipes_dir", lambda: recipes)
    recipes_table = (Recipe("demo_recipe", ("demo/tiny",), supports_distributed=False),)
    monkeypatch.setattr(recipe_registry, "RECIPES", recipes_table)
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.mark.parametrize("command", ["ls", "cp", "run", "validate"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: tunelite {command}" in capsys.readouterr().out


def test_ls_lists_every_recipe_and_config_with_recipe_on_first_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    rows = [line.split() for line in lines[1:]]
    expected = [
        [recipe.name, config] if index == 0 else [config]
        for recipe in recipe_registry.RECIPES
        for index, config in enumerate(recipe.configs)
    ]
    assert rows == expected


def test_cp_copies_builtin_config_and_adds_yaml_extension(fake_builtins: Path) -> None:
    assert main(["cp", "demo/tiny", str(fake_builtins / "mine")]) == 0
    assert (fake_builtins / "mine.yaml").read_text() == "batch_size: 1\n"


def test_cp_into_existing_folder_keeps_source_file_name(fake_builtins: Path) -> None:
    assert main(["cp", "demo_recipe", str(fake_builtins)]) == 0
    assert (fake_builtins / "demo_recipe.py").read_text() == "print('demo')\n"


def test_cp_refuses_to_overwrite_without_force(fake_builtins: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = fake_builtins / "mine.yaml"
    dest.write_text("my edits\n")
    assert main(["cp", "demo/tiny", str(dest)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert dest.read_text() == "my edits\n"


def test_cp_overwrites_with_force(fake_builtins: Path) -> None:
    dest = fake_builtins / "mine.yaml"
    dest.write_text("my edits\n")
    assert main(["cp", "demo/tiny", str(dest), "--force"]) == 0
    assert dest.read_text() == "batch_size: 1\n"
    assert sorted(p.name for p in fake_builtins.iterdir()) == ["mine.yaml"]  # no temporary file left


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
@pytest.mark.parametrize("target_exists", [True, False], ids=["link", "dangling-link"])
def test_cp_never_writes_through_a_symbolic_link(fake_builtins: Path, force: list[str], target_exists: bool,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    target = fake_builtins.parent / "elsewhere" / "authorized_keys"
    target.parent.mkdir()
    if target_exists:
        target.write_text("precious\n")
    (fake_builtins / "mine.yaml").symlink_to(target)
    assert main(["cp", "demo/tiny", str(fake_builtins / "mine.yaml"), *force]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert (target.read_text() == "precious\n") if target_exists else not target.exists()
    assert (fake_builtins / "mine.yaml").is_symlink()


def test_cp_creates_missing_parents_only_with_make_parents(
    fake_builtins: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = fake_builtins / "a" / "b" / "mine.yaml"
    assert main(["cp", "demo/tiny", str(dest)]) == 2
    assert "pass --make-parents" in capsys.readouterr().err
    assert not dest.parent.exists()
    assert main(["cp", "demo/tiny", str(dest), "--make-parents"]) == 0
    assert dest.read_text() == "batch_size: 1\n"


def test_cp_unknown_name_suggests_close_match(fake_builtins: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cp", "demo/tinyy", str(fake_builtins)]) == 2
    assert "did you mean demo/tiny?" in capsys.readouterr().err


def test_run_executes_script_path_with_overrides(recipe_script: Path, good_config: Path, tmp_path: Path) -> None:
    assert main(["run", str(recipe_script), "--config", str(good_config), "batch_size=4", "+seed=7"]) == 0
    received = (tmp_path / "out" / "received.yaml").read_text()
    assert "batch_size: 4" in received
    assert "seed: 7" in received


def test_run_refuses_a_script_that_declares_no_config_keys(
    recipe_script: Path, good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe_script.write_text(RECIPE_SCRIPT.replace("CONFIG_KEYS =", "KEYS ="))
    assert main(["run", str(recipe_script), "--config", str(good_config)]) == 2
    assert f"{recipe_script}: declares no CONFIG_KEYS" in capsys.readouterr().err


def test_run_reports_config_typo_as_one_line_and_exit_2(
    recipe_script: Path, good_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good_config.write_text(good_config.read_text() + "batch_sise: 3\n")
    assert main(["run", str(recipe_script), "--config", str(good_config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "did you mean batch_size?" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_run_refuses_torchrun_flags_for_single_device_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--nproc_per_node", "2", "lora_finetune_single_device", "--config", "tiny/lora_cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "lora_finetune_single_device runs on a single device" in err
    assert "use a recipe that supports distributed runs:" in err


def test_run_with_torchrun_flags_launches_torch_distributed_run(
    recipe_script: Path, good_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        launched.append(command)
        return subprocess.CompletedProcess(command, returncode=3)

    monkeypatch.setattr(subprocess, "run", fake_run)
    torchrun_flags = ["--nproc_per_node", "2", "--standalone"]
    code = main(["run", *torchrun_flags, str(recipe_script), "--config", str(good_config), "batch_size=4"])
    assert code == 3
    assert launched == [[
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(recipe_script), "--config", str(good_config), "batch_size=4",
    ]]


def test_run_unknown_recipe_suggests_close_match(good_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "lora_finetune_single_devic", "--config", str(good_config)]) == 2
    assert "did you mean lora_finetune_single_device" in capsys.readouterr().err


def test_validate_passes_good_config(
    recipe_script: Path, good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(recipe_script), "--config", str(good_config)]) == 0
    assert "Config is well-formed for my_recipe!" in capsys.readouterr().out


def test_validate_fails_on_typo_naming_key_path_and_close_match(
    recipe_script: Path, good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good_config.write_text(good_config.read_text().replace("lr: 1e-3", "lrr: 1e-3"))
    assert main(["validate", str(recipe_script), "--config", str(good_config)]) != 0
    err = capsys.readouterr().err
    assert "optimizer.lrr" in err
    assert "did you mean optimizer.lr?" in err


def test_validate_applies_overrides(recipe_script: Path, good_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_config.write_text(good_config.read_text() + "batch_sise: 3\n")
    assert main(["validate", str(recipe_script), "--config", str(good_config)]) != 0
    assert main(["validate", str(recipe_script), "--config", str(good_config), "~batch_sise"]) == 0
    assert "Config is well-formed for my_recipe!" in capsys.readouterr().out


def test_validate_finds_the_recipe_of_a_copied_config_from_its_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cp", "llama3_1/8B_full_single_device", str(tmp_path / "my.yaml")]) == 0
    assert main(["validate", str(tmp_path / "my.yaml"), "+save_merged_model=True"]) == 2
    err = capsys.readouterr().err
    assert "save_merged_model: not read by full_finetune_single_device" in err
    # Read by the LoRA recipe, the keys are right; what is left are the 8B files this machine lacks.
    assert main(["validate", "lora_finetune_single_device", "--config", str(tmp_path / "my.yaml"),
                 "~optimizer_in_bwd", "+save_merged_model=True"]) == 2
    err = capsys.readouterr().err
    assert "has 3 problems" in err and "not read by" not in err
    assert "checkpointer.checkpoint_dir: /models/Llama-3.1-8B-Instruct is not a folder" in err


def test_validate_asks_for_the_recipe_when_the_config_does_not_say(
    good_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(good_config)]) == 2
    assert f"name the recipe: tunelite validate RECIPE --config {good_config}" in capsys.readouterr().err
