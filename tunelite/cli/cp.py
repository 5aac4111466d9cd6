"""`tunelite cp`: copy a built-in config or recipe script out of the package to edit it."""

import argparse
import difflib
import os
import tempfile
from pathlib import Path
from typing import Any

from tunelite import recipe_registry
from tunelite.errors import ConfigError, TuneliteError


def add_parser(subcommands: Any) -> None:
    """Register `cp` on the `tunelite` parser."""
    parser = subcommands.add_parser("cp", help="copy a built-in config or recipe to edit", description=__doc__)
    parser.add_argument("name", help="built-in config (tiny/lora_cpu) or recipe (lora_finetune_single_device)")
    parser.add_argument("dest", help="file to write, or an existing folder to copy into under the source's file name")
    parser.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    parser.add_argument("--make-parents", action="store_true", help="create DEST's missing parent folders")
    parser.set_defaults(handler=copy_builtin)


def copy_builtin(args: argparse.Namespace) -> int:
    """Copy NAME's file to DEST, refusing to overwrite or create folders unless asked to."""
    source = builtin_source(args.name)
    dest = Path(args.dest)
    if dest.is_dir() or args.dest.endswith(("/", "\\")):
        dest = dest / source.name
    elif not dest.suffix:
        dest = dest.with_suffix(source.suffix)
    if dest.is_symlink():
        # Writing would land wherever the link points (a dangling one creates its target): refused,
        # --force or not.
        raise TuneliteError(f"{dest} is a symbolic link (to {os.readlink(dest)}); tunelite cp never writes through "
                            "one: remove the link or choose another destination")
    if dest.exists() and not args.force:
        raise TuneliteError(f"{dest} already exists; pass --force to overwrite it")
    if not dest.parent.is_dir():
        if not args.make_parents:
            raise TuneliteError(f"folder {dest.parent} does not exist; pass --make-parents to create it")
        dest.parent.mkdir(parents=True)
    write_replacing(dest, source.read_bytes())
    print(f"Copied {args.name} to {dest}")
    return 0


def write_replacing(dest: Path, data: bytes) -> None:
    """Writes `data` to a new file beside `dest` and renames it over `dest`: a rename replaces a link
    put there meanwhile instead of following it, and `dest` is never left half-written."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def builtin_source(name: str) -> Path:
    """The packaged file behind a recipe or built-in config name from the registry."""
    for recipe in recipe_registry.RECIPES:
        if name.removesuffix(".py") == recipe.name:
            return _packaged(recipe.path, name)
        if name.removesuffix(".yaml") in recipe.configs:
            return _packaged(recipe_registry.configs_dir() / f"{name.removesuffix('.yaml')}.yaml", name)
    names = [n for recipe in recipe_registry.RECIPES for n in (recipe.name, *recipe.configs)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "run `tunelite ls` to list them"
    raise ConfigError(f"no built-in recipe or config named {name!r}; {hint}")


def _packaged(path: Path, name: str) -> Path:
    if not path.is_file():
        raise TuneliteError(f"{name} is listed in the recipe registry but {path} is missing; reinstall tunelite")
    return path
