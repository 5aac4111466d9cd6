"""The recipes tunelite ships and the built-in configs each one accepts.

One table, read by `tunelite ls`, `cp` and `run`, so the CLI never guesses from file names.
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    name: str
    configs: tuple[str, ...]
    supports_distributed: bool

    @property
    def path(self) -> Path:
        return recipes_dir() / f"{self.name}.py"


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
    # Not training: chat with a trained model (`tunelite generate` runs it too).
    Recipe(
        name="generate",
        configs=("tiny/generation", "generation/llama3_1_8B"),
        supports_distributed=False,
    ),
)


def recipes_dir() -> Path:
    """Where the recipe scripts are, in a source checkout or an installed wheel alike."""
    return Path(str(resources.files("tunelite._recipes")))


def configs_dir() -> Path:
    """Where the built-in YAML configs are, in a source checkout or an installed wheel alike."""
    return Path(str(resources.files("tunelite._recipe_configs")))


def get_recipe(name: str) -> Recipe | None:
    return next((r for r in RECIPES if r.name == name), None)
