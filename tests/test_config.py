"""Config loading, overrides, `_component_` instantiation and validation (tunelite.config)."""

import datetime
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from tunelite import recipe_registry
from tunelite.cli.run import run_in_process
from tunelite.recipe_registry import RecipeKeys
from tunelite.config import (
    instantiate,
    load_config,
    parse_recipe_args,
    resolve_config_path,
    validate_config,
)
from tunelite.errors import ConfigError

BASE_YAML = """\
output_dir: /tmp/run
batch_size: 2
model:
  lora_rank: 8
  lora_attn_modules: [q_proj]
optimizer:
  _component_: torch.optim.AdamW
  lr: 1e-3
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(BASE_YAML)
    return path


def test_override_sets_nested_key(config_file: Path) -> None:
    cfg = load_config(config_file, ["model.lora_rank=16"])
    assert cfg.model.lora_rank == 16


def test_override_values_parse_as_yaml(config_file: Path) -> None:
    cfg = load_config(
        config_file,
        ["batch_size=4", "optimizer.lr=2e-4", "model.lora_attn_modules=[q_proj,v_proj]", "+compile=true", "+seed=null"],
    )
    assert cfg.batch_size == 4
    assert cfg.optimizer.lr == pytest.approx(2e-4)
    assert list(cfg.model.lora_attn_modules) == ["q_proj", "v_proj"]
    assert cfg.compile is True
    assert cfg.seed is None


def test_float_in_file_and_override_both_load_as_float(config_file: Path) -> None:
    assert isinstance(load_config(config_file).optimizer.lr, float)
    assert isinstance(load_config(config_file, ["optimizer.lr=3e-3"]).optimizer.lr, float)


def test_tilde_deletes_nested_key(config_file: Path) -> None:
    cfg = load_config(config_file, ["~model.lora_rank", "~batch_size"])
    assert "lora_rank" not in cfg.model
    assert "batch_size" not in cfg


def test_plus_adds_new_nested_key(config_file: Path) -> None:
    cfg = load_config(config_file, ["+model.apply_lora_to_mlp=true", "+profiler.enabled=false"])
    assert cfg.model.apply_lora_to_mlp is True
    assert cfg.profiler.enabled is False


def test_override_of_unknown_key_is_refused_with_close_match_and_plus_hint(config_file: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(config_file, ["model.lora_rnak=16"])
    message = str(error.value)
    assert "'model.lora_rnak=16'" in message
    assert "did you mean model.lora_rank?" in message
    assert "+model.lora_rnak=16" in message


def test_plus_on_existing_key_is_refused(config_file: Path) -> None:
    with pytest.raises(ConfigError, match="already exists; drop the \\+"):
        load_config(config_file, ["+batch_size=4"])


def test_deleting_a_missing_key_is_refused(config_file: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean model.lora_rank"):
        load_config(config_file, ["~model.lora_rnak"])


def test_override_without_equals_is_refused(config_file: Path) -> None:
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(config_file, ["batch_size"])


def test_load_config_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=str(missing)):
        load_config(missing)


def test_resolve_config_path_accepts_a_file_path(config_file: Path) -> None:
    assert resolve_config_path(str(config_file)) == config_file


@pytest.fixture
def builtin_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A built-in configs folder holding tiny/lora_cpu.yaml alone."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "lora_cpu.yaml").write_text(BASE_YAML)
    monkeypatch.setattr(recipe_registry, "configs_dir", lambda: tmp_path)
    return tmp_path


def test_resolve_config_path_finds_builtin_name_with_or_without_yaml(builtin_configs: Path) -> None:
    assert resolve_config_path("tiny/lora_cpu") == builtin_configs / "tiny" / "lora_cpu.yaml"
    assert resolve_config_path("tiny/lora_cpu.yaml") == builtin_configs / "tiny" / "lora_cpu.yaml"


@pytest.mark.usefixtures("builtin_configs")
def test_resolve_config_path_unknown_name_suggests_close_builtin() -> None:
    with pytest.raises(ConfigError, match="did you mean tiny/lora_cpu"):
        resolve_config_path("tiny/lora_cpuu")


def test_asset_resolver_gives_existing_absolute_path() -> None:
    cfg = OmegaConf.create({"path": "${asset:__init__.py}"})
    path = Path(cfg.path)
    assert path.is_absolute()
    assert path.is_file()
    assert path.parent.name == "assets"


def test_unknown_asset_is_reported_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("tokenizer:\n  path: ${asset:tiny/no_such_file}\n")
    with pytest.raises(ConfigError, match="tokenizer.path: no asset 'tiny/no_such_file'"):
        validate_config(load_config(path), KEYS)


def test_instantiate_builds_nested_components_and_plain_containers() -> None:
    cfg = OmegaConf.create({
        "trusted_components": ["types", "datetime", "fractions"],
        "thing": {
            "_component_": "types.SimpleNamespace",
            "delay": {"_component_": "datetime.timedelta", "days": 2},
            "settings": {"a": 1},
            "parts": [{"_component_": "fractions.Fraction", "numerator": 1, "denominator": 2}, 3],
        }
    })
    thing = instantiate(cfg.thing)
    assert thing.delay == datetime.timedelta(days=2)
    assert type(thing.settings) is dict and thing.settings == {"a": 1}
    assert type(thing.parts) is list and thing.parts == [Fraction(1, 2), 3]


def test_instantiate_passes_recipe_args_and_kwargs_over_config() -> None:
    cfg = OmegaConf.create({"optimizer": {"_component_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.1}})
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer, params, momentum=0.9)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["params"][0] is params[0]
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert optimizer.param_groups[0]["momentum"] == 0.9


def test_instantiate_resolves_interpolations_against_the_whole_config() -> None:
    cfg = OmegaConf.create({
        "output_dir": "/tmp/run",
        "trusted_components": ["types"],
        "logger": {"_component_": "types.SimpleNamespace", "log_dir": "${output_dir}/logs"},
    })
    assert instantiate(cfg.logger).log_dir == "/tmp/run/logs"


def test_instantiate_misspelt_component_names_key_and_suggests_match() -> None:
    cfg = OmegaConf.create({"optimizer": {"_component_": "torch.optim.AdamWW", "lr": 1e-3}})
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.optimizer, [])
    assert "optimizer._component_" in str(error.value)
    assert "did you mean torch.optim.AdamW?" in str(error.value)


def test_instantiate_misspelt_module_suggests_match() -> None:
    cfg = OmegaConf.create({"optimizer": {"_component_": "torch.optimm.AdamW"}})
    with pytest.raises(ConfigError, match="did you mean torch.optim.AdamW\\?"):
        instantiate(cfg.optimizer, [])


def test_instantiate_misspelt_key_names_full_key_path_and_close_match() -> None:
    cfg = OmegaConf.create({"optimizer": {"_component_": "torch.optim.AdamW", "lrr": 1e-3}})
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    assert "optimizer.lrr" in str(error.value)
    assert "did you mean optimizer.lr?" in str(error.value)


def test_instantiate_missing_argument_is_config_error_naming_the_key() -> None:
    cfg = OmegaConf.create({"trusted_components": ["string"], "greeting": {"_component_": "string.Template"}})
    with pytest.raises(ConfigError, match="add greeting.template to the config"):
        instantiate(cfg.greeting)


def test_type_error_raised_inside_the_component_is_not_rewritten() -> None:
    cfg = OmegaConf.create({"trusted_components": ["fractions"],
                            "ratio": {"_component_": "fractions.Fraction", "numerator": [1]}})
    with pytest.raises(TypeError):
        instantiate(cfg.ratio)


def test_instantiate_without_component_names_the_node() -> None:
    cfg = OmegaConf.create({"dataset": {"source": "x.json"}})
    with pytest.raises(ConfigError, match="dataset: has no _component_"):
        instantiate(cfg.dataset)


# The keys of a recipe in miniature, as a recipe's CONFIG_KEYS declares them.
KEYS = RecipeKeys("a_recipe", required=("output_dir",),
                  optional=("batch_size", "clip_grad_norm", "model", "optimizer", "loss", "metric_logger", "seed",
                            "tokenizer"))


def test_validate_accepts_config_whose_components_and_keys_exist() -> None:
    cfg = OmegaConf.create({
        "output_dir": "/tmp/run",
        "batch_size": 2,
        "trusted_components": ["types"],
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},
        "loss": {"_component_": "torch.nn.CrossEntropyLoss", "ignore_index": -100},
        "metric_logger": [{"_component_": "types.SimpleNamespace", "log_dir": "${output_dir}/logs", "anything": 1}],
    })
    validate_config(cfg, KEYS)


def test_validate_reports_every_problem_with_key_path_and_close_match() -> None:
    cfg = OmegaConf.create({
        "batch_sise": 2,
        "max_grad_norm": 1.0,
        "trusted_components": ["string"],
        "model": {"_component_": "torch.nn.Linear", "in_features": 2, "out_featurs": 3},
        "optimizer": {"_component_": "torch.optim.AdamWW", "lr": 1e-3},
        "metric_logger": [{"_component_": "string.Template", "templat": "x"}],
    })
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, KEYS, source="my.yaml")
    message = str(error.value)
    assert message.startswith("my.yaml has 6 problems:")
    assert "batch_sise: not read by a_recipe (did you mean batch_size?" in message
    assert "max_grad_norm: not read by a_recipe (did you mean clip_grad_norm?" in message
    assert "output_dir: required by a_recipe; set it" in message
    assert "model.out_featurs: not a parameter of torch.nn.Linear (did you mean model.out_features?)" in message
    assert "optimizer._component_" in message and "did you mean torch.optim.AdamW?" in message
    assert "metric_logger.0.templat" in message and "did you mean metric_logger.0.template?" in message


def test_validate_reports_unresolvable_interpolation_and_missing_value() -> None:
    cfg = OmegaConf.create({"output_dir": "${ouput}/x", "seed": "???"})
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, KEYS)
    assert "output_dir: Interpolation key 'ouput' not found" in str(error.value)
    assert "seed: value is missing" in str(error.value)


def test_validate_imports_components_without_calling_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "exploding_component.py").write_text(
        "def build(size: int) -> None:\n    raise AssertionError('validate_config must not call components')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    validate_config(OmegaConf.create({"output_dir": "x", "trusted_components": ["exploding_component"],
                                      "model": {"_component_": "exploding_component.build", "size": 3}}), KEYS)
    assert "exploding_component" in sys.modules


def test_parse_recipe_args_applies_overrides_and_keeps_interpolations_until_read(config_file: Path) -> None:
    config_file.write_text(BASE_YAML + "log_dir: ${output_dir}/logs\n")
    keys = RecipeKeys("a_recipe", ("output_dir", "batch_size", "model", "optimizer", "log_dir"))
    cfg = parse_recipe_args(keys, ["--config", str(config_file), "batch_size=8", "output_dir=/tmp/other"])
    assert isinstance(cfg, DictConfig)
    assert cfg.batch_size == 8
    assert cfg.log_dir == "/tmp/other/logs"
    assert OmegaConf.is_interpolation(cfg, "log_dir")  # as written, for the loggers: never a resolved secret


def test_parse_recipe_args_rejects_a_typo_before_anything_is_built(config_file: Path) -> None:
    config_file.write_text(BASE_YAML + "batch_sise: 3\n")
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        parse_recipe_args(RecipeKeys("a_recipe", ("output_dir", "batch_size", "model", "optimizer")),
                          ["--config", str(config_file)])


def recipe_script(folder: Path, body: str) -> Path:
    """A recipe in miniature: declares the keys BASE_YAML holds and runs `body` as its main."""
    script = folder / "recipe.py"
    script.write_text(
        "from tunelite.config import recipe_entry\n"
        "CONFIG_KEYS = {'required': ('output_dir', 'batch_size', 'model', 'optimizer')}\n"
        f"def main(cfg):\n    {body}\n"
        "if __name__ == '__main__':\n    recipe_entry(main)\n"
    )
    return script


def test_recipe_entry_prints_user_error_and_exits_2_without_traceback(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = recipe_script(tmp_path, f"open({str(tmp_path / 'called')!r}, 'w').close()")
    assert run_in_process([str(script), "--config", str(config_file), "model.lora_rnak=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'model.lora_rnak=4'")
    assert "Traceback" not in err
    assert not (tmp_path / "called").exists()


def test_recipe_entry_passes_config_to_main_and_lets_other_errors_propagate(config_file: Path, tmp_path: Path) -> None:
    script = recipe_script(tmp_path, "raise RuntimeError(f'main saw batch_size={cfg.batch_size}')")
    with pytest.raises(RuntimeError, match="main saw batch_size=5"):
        run_in_process([str(script), "--config", str(config_file), "batch_size=5"])
