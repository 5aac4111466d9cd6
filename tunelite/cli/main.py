"""Entry point of the `tunelite` command: builds the subcommand parsers and reports user errors.

A `TuneliteError` from any subcommand is printed as `error: <message>` with exit code 2, so a
typo on the command line or in a config never shows up as a traceback.
"""

import argparse
import sys
from collections.abc import Sequence

from tunelite.cli import cp, download, estimate, export, generate, ls, merge, run, serve, upload, validate
from tunelite.errors import TuneliteError


def build_parser() -> argparse.ArgumentParser:
    """The `tunelite` parser with one subparser per subcommand module."""
    parser = argparse.ArgumentParser(prog="tunelite", description="Fine-tune Llama models with native PyTorch recipes.")
    subcommands = parser.add_subparsers(title="subcommands", dest="command", required=True, metavar="COMMAND")
    for module in (ls, cp, run, validate, generate, estimate, download, merge, serve, upload, export):
        module.add_parser(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `tunelite` subcommand and return its exit code."""
    parser = build_parser()
    # Overrides after `--config X` would be rejected by a plain parse_args (argparse fills a `*`
    # positional at its first chance), so they are collected from the unparsed rest.
    args, rest = parser.parse_known_args(argv)
    if rest and (not hasattr(args, "overrides") or any(arg.startswith("-") for arg in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    try:
        return args.handler(args)
    except TuneliteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
