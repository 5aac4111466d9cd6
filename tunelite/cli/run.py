"""`tunelite run`: run a recipe on a config, in this process or under torchrun.

The recipe is a built-in name (`tunelite ls`) or the path of a recipe script, such as a copy made
with `tunelite cp lora_finetune_single_device my_recipe.py` and edited. Without torchrun options
the recipe runs in-process, as `python recipe.py --config ...` would; with them it is launched
through `torch.distributed.run`, after the config is validated once here rather than once per
process.
"""

import argparse
import runpy
import subprocess
import sys
from typing import Any

from tunelite import recipe_registry
from tunelite.config import add_trust_option, load_recipe_config, resolve_config_path
from tunelite.errors import ConfigError
from tunelite.runtime.command_line import recorded_command_line

# torchrun options passed through as given; `--standalone` is a flag and handled on its own.
TORCHRUN_OPTIONS = (
    "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id", "master_addr", "master_port",
)


def add_parser(subcommands: Any) -> None:
    """Register `run` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "run",
        help="run a recipe on a config",
        description=__doc__,
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    torchrun = parser.add_argument_group("torchrun options (launch several processes)")
    for option in TORCHRUN_OPTIONS:
        torchrun.add_argument(f"--{option}", help=f"passed to torchrun as --{option}")
    torchrun.add_argument("--standalone", action="store_true", help="passed to torchrun as --standalone")
    parser.add_argument("recipe", help="recipe name (see `tunelite ls`) or a path to a .py recipe script")
    parser.add_argument("--config", required=True, help="built-in config name (see `tunelite ls`) or a YAML path")
    add_trust_option(parser)
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    parser.set_defaults(handler=run_recipe)


def run_recipe(args: argparse.Namespace) -> int:
    """Find the recipe and config, then run in-process or launch torchrun; return the exit code."""
    recipe = recipe_registry.get_recipe(args.recipe)
    launch = torchrun_args(args)
    if launch and recipe is not None and not recipe.supports_distributed:
        distributed = [r.name for r in recipe_registry.RECIPES if r.supports_distributed]
        alternatives = ", ".join(distributed) if distributed else "none yet"
        raise ConfigError(
            f"{recipe.name} runs on a single device and cannot be launched with torchrun options "
            f"({' '.join(launch)}); drop them, or use a recipe that supports distributed runs: {alternatives}"
        )
    script = recipe_registry.recipe_script(args.recipe)
    config = resolve_config_path(args.config)
    trust = [item for package in args.trust for item in ("--trust", package)]
    command = [str(script), "--config", str(config), *trust, *args.overrides]
    typed = ["tunelite", "run", *launch, args.recipe, "--config", args.config, *trust, *args.overrides]
    with recorded_command_line(typed):
        if not launch:
            return run_in_process(command)
        load_recipe_config(config, recipe_registry.read_declarations(script).keys, args.overrides, trust=args.trust)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, *command]).returncode


def torchrun_args(args: argparse.Namespace) -> list[str]:
    """The torchrun options the user gave, in torchrun's own spelling; empty means run in-process."""
    launch = [item for option in TORCHRUN_OPTIONS if getattr(args, option) is not None
              for item in (f"--{option}", getattr(args, option))]
    return [*launch, "--standalone"] if args.standalone else launch


def run_in_process(argv: list[str]) -> int:
    """Run the script at argv[0] as `__main__` with argv, and return its exit code."""
    saved = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
