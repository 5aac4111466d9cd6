"""Every `tunelite` command the README shows runs as written, in the README's order (so `my.yaml`
is the config its `tunelite cp` made, and `my_recipe.py` the recipe copy, edited as it says).

What needs nothing downloaded runs for real: ls, cp, estimate (it reads no weights) and the tiny
generation. Of download, merge, serve, upload and export, which need the Hub or a run's output,
the options are parsed. A command whose files this machine lacks (the 8B weights, a GPU run, two nodes) is
checked as far as a machine without them can: its options parse, and its config with its
overrides is what its recipe reads, value for value; only the files it names may be missing.
"""

import argparse
import re
import shlex
from pathlib import Path

from tunelite import recipe_registry
from tunelite.cli.main import build_parser, main
from tunelite.config import load_recipe_config

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """The `tunelite ...` lines of the README's shell blocks, continuation lines joined, comments
    and a `$ ` prompt dropped, and of `a && b && tunelite ...` the tunelite part."""
    commands = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S):
        if language not in ("", "bash", "console", "sh"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ").split("&&")[-1].strip()
            if line.startswith("tunelite "):
                commands.append(line)
    return commands


def test_the_readme_shows_the_commands_this_test_runs():
    commands = [shlex.split(command, comments=True)[1] for command in readme_commands()]
    assert {"ls", "cp", "validate", "run", "estimate", "generate"} <= set(commands)


# The README asks its reader to add the new key to the copy's CONFIG_KEYS; this is that edit.
README_EDIT = ('"resume_from_checkpoint", "log_peak_memory_stats",',
               '"resume_from_checkpoint", "log_peak_memory_stats", "adapter_l2",')


def recipe_of(args: argparse.Namespace) -> str:
    """The recipe a parsed `tunelite` command runs or checks."""
    if args.command == "generate":
        return "generate"
    if args.command == "validate":
        return args.target if args.config else recipe_registry.recipe_of_config(Path(args.target))
    return args.recipe


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        argv = shlex.split(command, comments=True)[1:]
        args, rest = build_parser().parse_known_args(argv)
        overrides = [*getattr(args, "overrides", []), *rest]
        if args.command in ("ls", "cp", "estimate") or (args.command == "generate" and args.config.startswith("tiny/")):
            assert main(argv) in ((0, 1) if args.command == "estimate" else (0,)), command
            if argv[:2] == ["cp", "lora_finetune_single_device"]:
                copy = Path(argv[2])
                copy.write_text(copy.read_text().replace(*README_EDIT))
            continue
        if args.command in ("download", "merge", "serve", "upload", "export"):
            continue  # they need the Hub, a GPU or a run's output: that their options parse is what is checked
        keys = recipe_registry.read_declarations(recipe_registry.recipe_script(recipe_of(args))).keys
        config = args.config or args.target
        load_recipe_config(config, keys, overrides, check_paths=config.startswith("tiny/"))
    assert "error" not in capsys.readouterr().err
