"""The recipes tunelite ships, the built-in configs each one accepts, and what each recipe declares.

One table, read by `tunelite ls`, `cp`, `run`, `validate` and `estimate`, so the CLI never guesses
from file names. A recipe declares the config keys it reads (CONFIG_KEYS) and, when it trains,
what the memory estimate needs to know of it (MEMORY); both are read from the script's source
without importing it, so checking a config stays fast and works on a user's edited copy too.
"""

import ast
import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tunelite.errors import ConfigError
from tunelite.files import MAX_CONFIG_BYTES, read_bounded


@dataclass(frozen=True)
class Recipe:
    name: str
    configs: tuple[str, ...]
    supports_distributed: bool

    @property
    def path(self) -> Path:
        return recipes_dir() / f"{self.name}.py"


@dataclass(frozen=True)
class RecipeKeys:
    """The top-level config keys one recipe reads, as its CONFIG_KEYS declares them: those a config
    must set and those it may. Any other key is read by nothing and refused."""

    recipe: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return self.required + self.optional


@dataclass(frozen=True)
class RecipeDeclarations:
    """What a recipe script declares: its config keys, and (training recipes) its MEMORY facts, e.g.
    {"trains": "adapters" | "all", "sequences_per_sample": 1}."""

    keys: RecipeKeys
    memory: dict[str, Any] | None


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        name="lora_finetune_single_device",
        configs=(
            "tiny/lora_cpu",
            "tiny/qlora_cpu",
            "llama3_1/8B_lora_single_device",
            "llama3_1/8B_qlora_single_device",
            "llama3_2/1B_lora_single_device",
            "llama3_2/3B_lora_single_device",
            "llama2/7B_lora_single_device",
            "tiny/qwen_lora_cpu",
            "qwen2_5/7B_lora_single_device",
            "qwen3/8B_lora_single_device",
            "mistral/7B_lora_single_device",
            "mistral/7B_qlora_single_device",
            "phi3/mini_lora_single_device",
            "phi4/mini_lora_single_device",
            "gemma2/2B_lora_single_device",
            "smollm2/1_7B_lora_single_device",
            "gpt2/124M_lora_single_device",
        ),
        supports_distributed=False,
    ),
    Recipe(
        name="full_finetune_single_device",
        configs=("tiny/full_cpu", "llama3_1/8B_full_single_device"),
        supports_distributed=False,
    ),
    Recipe(
        name="lora_finetune_distributed",
        configs=("tiny/lora_distributed_cpu", "llama3_1/8B_lora", "llama3_1/70B_lora"),
        supports_distributed=True,
    ),
    Recipe(
        name="full_finetune_distributed",
        configs=("tiny/full_distributed_cpu", "llama3_1/8B_full", "llama3_1/70B_full"),
        supports_distributed=True,
    ),
    Recipe(
        name="lora_dpo_single_device",
        configs=("tiny/lora_dpo_cpu", "llama3_1/8B_lora_dpo_single_device"),
        supports_distributed=False,
    ),
    # Not training: chat with a trained model (`tunelite generate` runs it too).
    Recipe(
        name="generate",
        configs=("tiny/generation", "generation/llama3_1_8B"),
        supports_distributed=False,
    ),
)


def recipes_dir() -> Path:
    """Where the recipe scripts are, in a source checkout or an installed wheel alike."""
    return _shipped("tunelite._recipes", "recipes")


def configs_dir() -> Path:
    """Where the built-in YAML configs are, in a source checkout or an installed wheel alike."""
    return _shipped("tunelite._recipe_configs", "recipe_configs")


def _shipped(package: str, folder: str) -> Path:
    """A folder the wheel ships as `package`; in a checkout used without installing (on PYTHONPATH,
    as on a bare GPU machine) the folder beside the tunelite package."""
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / folder


def get_recipe(name: str) -> Recipe | None:
    return next((r for r in RECIPES if r.name == name), None)


def recipe_script(name: str) -> Path:
    """The script a user named: a registered recipe's, or `name` itself when it is a path to a .py file
    (a recipe copied with `tunelite cp` and edited)."""
    recipe = get_recipe(name)
    if recipe is not None:
        if not recipe.path.is_file():
            raise ConfigError(f"recipe {name} is registered but {recipe.path} is missing; reinstall tunelite")
        return recipe.path
    path = Path(name)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"recipe script {path} does not exist")
        return path
    names = [r.name for r in RECIPES]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"recipes: {', '.join(names)}"
    raise ConfigError(f"no recipe named {name!r}; {hint} (or pass a path to a .py script)")


def read_declarations(script: Path) -> RecipeDeclarations:
    """CONFIG_KEYS and MEMORY of a recipe script, read from its source as literals."""
    try:
        tree = ast.parse(read_bounded(script, MAX_CONFIG_BYTES, "recipe script", ConfigError), filename=str(script))
    except SyntaxError as error:
        raise ConfigError(f"{script}:{error.lineno}: the recipe is not valid Python ({error.msg})") from None
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("CONFIG_KEYS", "MEMORY"):
                try:
                    found[name] = ast.literal_eval(node.value)
                except ValueError:
                    raise ConfigError(f"{script}:{node.lineno}: {name} must be written as a literal (a dict of "
                                      "strings and tuples), so it can be read without running the recipe") from None
    declared = found.get("CONFIG_KEYS")
    if not isinstance(declared, dict) or not isinstance(declared.get("required", ()), (tuple, list)):
        raise ConfigError(f"{script}: declares no CONFIG_KEYS = {{'required': (...), 'optional': (...)}}, the config "
                          "keys it reads; add it (see the built-in recipes)")
    keys = RecipeKeys(Path(script).stem, tuple(declared.get("required", ())), tuple(declared.get("optional", ())))
    return RecipeDeclarations(keys, found.get("MEMORY"))


_RUN_COMMAND = re.compile(r"tunelite run (?:--\S+ \S+ )*(\S+)")


def recipe_of_config(config: Path) -> str | None:
    """The recipe a config file is for, when it says: a built-in config's from this table, else a
    `tunelite run <recipe>` in its comments (the built-in configs' headers have one, and a config
    copied with `tunelite cp` keeps it). None when the file does not say."""
    config = Path(config).resolve()
    for recipe in RECIPES:
        if any((configs_dir() / f"{name}.yaml").resolve() == config for name in recipe.configs):
            return recipe.name
    text = read_bounded(config, MAX_CONFIG_BYTES, "config file", ConfigError).decode("utf-8", errors="replace")
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    for line in comments:
        match = _RUN_COMMAND.search(line)
        if match and (get_recipe(match.group(1)) or match.group(1).endswith(".py")):
            return match.group(1)
    return None
