"""A config runs code only from packages the user trusts: tunelite, torch and torchao, and those the
config (`trusted_components: [pkg]`) or the command line (`--trust pkg`) names. Anything else is
refused before it is imported, with the key and the fix; `validate` lists what it would import."""

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tunelite.cli.main import main
from tunelite.config import instantiate, load_config, validate_config
from tunelite.errors import ConfigError
from tunelite.recipe_registry import RecipeKeys

# A package a downloaded config might name: importing it runs its code.
MODULE = """\
from pathlib import Path

import torch

Path(__file__).with_name("imported").touch()


def loss(num_chunks: int = 8):
    from tunelite.modules.loss import LinearCrossEntropyLoss

    return LinearCrossEntropyLoss(num_chunks)


class Optimizer(torch.optim.SGD):
    pass
"""


@pytest.fixture
def outside_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`strange_pkg`, importable, marking `imported` beside itself when imported."""
    package = tmp_path / "strange_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "strange_pkg", raising=False)
    return package / "imported"


def test_os_system_in_a_config_is_refused_by_validate_and_by_run(tmp_path, capsys):
    assert main(["validate", "tiny/lora_cpu", "loss._component_=os.system", "+loss.command=touch pwned"]) == 2
    err = capsys.readouterr().err
    assert "loss._component_: os.system is not from tunelite, torch or torchao" in err
    assert "trusted_components: [os]" in err and "--trust os" in err
    out = tmp_path / "out"
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={out}",
                 "loss._component_=os.system", "+loss.command=touch pwned"]) == 2
    assert "loss._component_: os.system" in capsys.readouterr().err
    assert not out.exists() and not Path("pwned").exists()


def test_an_untrusted_package_is_refused_before_it_is_imported(outside_package, capsys):
    assert main(["validate", "tiny/lora_cpu", "loss._component_=strange_pkg.loss"]) == 2
    assert "loss._component_: strange_pkg.loss is not from tunelite" in capsys.readouterr().err
    assert not outside_package.exists() and "strange_pkg" not in sys.modules


@pytest.mark.parametrize("trust", [["+trusted_components=[strange_pkg]"], ["--trust", "strange_pkg"]],
                         ids=["config-key", "command-line"])
def test_a_trusted_package_is_imported_and_listed_by_validate(outside_package, trust, capsys):
    assert main(["validate", "tiny/lora_cpu", "loss._component_=strange_pkg.loss", *trust]) == 0
    out = capsys.readouterr().out
    assert "Imports from outside tunelite, torch and torchao (trusted): strange_pkg.loss" in out
    assert outside_package.exists()


def test_a_trusted_package_trains_through_run(outside_package, tmp_path):
    assert main(["run", "lora_finetune_single_device", "--config", "tiny/lora_cpu", f"output_dir={tmp_path / 'out'}",
                 "epochs=1", "max_steps_per_epoch=1", "save_merged_model=False", "--trust", "strange_pkg",
                 "loss._component_=strange_pkg.loss"]) == 0
    assert (tmp_path / "out" / "step_1" / "adapter").is_dir()


@pytest.mark.parametrize("dotted", ["torch.hub.load", "torch.load", "torch.utils.cpp_extension.load_inline",
                                    "tunelite.cli.run.run_in_process"])
def test_code_loaders_inside_trusted_packages_are_refused(dotted):
    cfg = OmegaConf.create({"output_dir": "x", "model": {"_component_": dotted}})
    with pytest.raises(ConfigError, match=f"model._component_: {dotted} is refused"):
        validate_config(cfg, RecipeKeys("a_recipe", ("output_dir", "model")))
    with pytest.raises(ConfigError, match="is refused"):
        instantiate(cfg.model)


def test_a_dotted_path_a_component_resolves_itself_is_held_to_the_configs_trust(outside_package):
    """cpu_offload_optimizer imports the optimizer its `optimizer` argument names: that import is
    checked against the trust of the config being built, too."""
    cfg = OmegaConf.create({"optimizer": {"_component_": "tunelite.training.optimizers.cpu_offload_optimizer",
                                          "optimizer": "strange_pkg.Optimizer"}})
    with pytest.raises(ConfigError, match="strange_pkg.Optimizer is not from tunelite"):
        instantiate(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    assert not outside_package.exists()


def test_trusted_components_must_list_package_names(tmp_path, capsys):
    assert main(["validate", "tiny/lora_cpu", "+trusted_components=strange_pkg"]) == 2
    assert "trusted_components: must be a list of package names" in capsys.readouterr().err


def test_the_tests_own_components_are_trusted_by_name_not_by_a_loosened_check(tmp_path):
    """faults_helpers is named by the fault tests' configs; without saying so, it is refused too."""
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: x\nloss:\n  _component_: faults_helpers.FaultyLoss\n")
    keys = RecipeKeys("a_recipe", ("output_dir", "loss"))
    with pytest.raises(ConfigError, match="faults_helpers"):
        validate_config(load_config(config), keys)
    validate_config(load_config(config, ["+trusted_components=[faults_helpers]"]), keys)
