"""A newcomer's first commands answer at once: `tunelite --help`, `ls`, `cp`, every subcommand's
`--help`, and `validate` of a config's keys, values and paths import no torch (seconds on a laptop,
with torchao and dynamo behind it); only comparing a model with an existing checkpoint does.
Counted as modules imported, in a fresh interpreter, not as seconds."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tunelite.config import load_config
from tunelite.config.signatures import TABLE, build_table, tabled_signature
from tunelite.recipe_registry import RECIPES, configs_dir

# Runs `tunelite ARGS` and prints, as its last line, its exit code and every module it imported.
PROBE = """\
import json, sys
from tunelite.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def imported_by(*args: str, cwd: Path) -> tuple[int, set[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    return result["code"], set(result["modules"])


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["ls"], 0),
    (["cp", "tiny/lora_cpu", "mine.yaml"], 0),
    *[([command, "--help"], 0) for command in ("ls", "cp", "run", "validate", "generate", "estimate", "merge", "serve",
                                               "upload", "export")],
    (["validate", "tiny/generation"], 0),  # no model to compare with its checkpoint
    (["validate", "llama3_1/8B_lora_single_device"], 2),  # its files are not on this machine: named, fast
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_first_commands_do_not_import_torch(args, code, tmp_path):
    exit_code, modules = imported_by(*args, cwd=tmp_path)
    assert exit_code == code
    assert "torch" not in modules and "tunelite.models" not in modules


def test_validate_imports_torch_only_to_compare_the_model_with_its_checkpoint(tmp_path):
    code, modules = imported_by("validate", "tiny/lora_cpu", cwd=tmp_path)
    assert code == 0 and "torch" in modules


@pytest.mark.parametrize("config", [name for recipe in RECIPES for name in recipe.configs])
def test_every_component_of_the_built_in_configs_is_in_the_signature_table(config):
    """So validating them reads no module; the table is rebuilt by scripts/make_signature_table.py."""
    plain = OmegaConf.to_container(load_config(configs_dir() / f"{config}.yaml"))
    components = re.findall(r"'_component_': '([\w.]+)'", str(plain))
    assert components and [dotted for dotted in components if tabled_signature(dotted) is None] == []


def test_the_signature_table_matches_the_code():
    """A changed signature of a tunelite component changes the table too: if this fails, run
    `python scripts/make_signature_table.py` and commit signatures.json. torch's and torchao's
    entries are compared when the installed versions are those the table records."""
    shipped = json.loads(TABLE.read_text())
    current = json.loads(json.dumps(build_table()))

    def ours(table: dict, same_versions: bool) -> dict:
        """tunelite's entries (torch's too at the same versions), but those of modules either machine
        could not import (triton's kernels where there is no triton)."""
        skipped = tuple(f"{module}." for module in shipped["skipped"] + current["skipped"])
        return {name: entry for name, entry in table["components"].items()
                if (name.startswith("tunelite.") or same_versions) and not name.startswith(skipped)}
    same = shipped["versions"] == current["versions"]
    assert ours(shipped, same) == ours(current, same)
