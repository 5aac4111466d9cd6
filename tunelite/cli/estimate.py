"""`tunelite estimate`: predict a training config's peak GPU memory before running it.

Reads the checkpoint's config.json only (no weights), and prints the memory by component
(weights, adapter, gradients, optimizer state, activations, logits/loss, workspace, CUDA
context, pinned host memory) under the run's memory policy, what each policy would need
(keep, recompute, offload, recompute+offload) and which one `memory_budget_gib` would pick for
the card, and whether the run fits; when it does not, overrides that would make it fit. With
--max-seq, the longest sample (batch 1) that fits the card. Exit code 1 when it does not fit.
With --nproc-per-node N (a distributed recipe, sharded with FSDP2), every figure is one GPU's.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tunelite import recipe_registry
from tunelite.config import add_trust_option, load_recipe_config

if TYPE_CHECKING:
    from tunelite.training.memory_estimate import MemoryModel, MemoryPlan


def add_parser(subcommands: Any) -> None:
    """Register `estimate` on the `tunelite` parser."""
    parser = subcommands.add_parser(
        "estimate",
        help="predict a config's peak GPU memory and whether it fits",
        description=__doc__,
        epilog="Overrides: key=value sets a key, +key=value adds one, ~key deletes one.",
    )
    parser.add_argument("recipe", help="a training recipe's name (see `tunelite ls`) or the path of a recipe script")
    parser.add_argument("--config", required=True, help="built-in config name (see `tunelite ls`) or a YAML path")
    parser.add_argument("--gpu-memory", help="the card's memory, e.g. 24GB (default: this machine's GPU, if any)")
    parser.add_argument("--seq-len", type=int, help="longest sample in tokens (default: tokenizer.max_seq_len)")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", type=process_count, default=1, dest="nproc_per_node",
                        metavar="N",
                        help="processes a distributed recipe shards the model over with FSDP2 (on several machines, "
                             "N x the machines): every figure is then per GPU (default: 1, one device holds "
                             "everything)")
    add_trust_option(parser)
    parser.add_argument("--max-seq", action="store_true",
                        help="also print the longest sample (batch 1) that fits the card, with the policy that fits it")
    parser.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
    parser.set_defaults(handler=estimate)


def process_count(text: str) -> int:
    """--nproc-per-node: a whole number of processes, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes; give 1 or more, e.g. 8")
    return value


def estimate(args: argparse.Namespace) -> int:
    """Print the breakdown, the policies and the verdict; 0 when it fits (or no card is known), 1 when not."""
    import torch  # here, not at the top: `tunelite ls` and `--help` should not wait for torch

    from tunelite.training.memory_estimate import (
        fitting_overrides,
        gib,
        memory_model,
        merge_overrides,
        parse_memory_size,
        recipe_memory,
    )

    overrides = [*args.overrides, *([f"tokenizer.max_seq_len={args.seq_len}"] if args.seq_len else [])]
    declarations = recipe_registry.read_declarations(recipe_registry.recipe_script(args.recipe))
    recipe = recipe_memory(declarations)
    # The files need not exist yet: an estimate is for deciding what to download.
    cfg = load_recipe_config(args.config, declarations.keys, overrides, trust=args.trust, check_paths=False)
    model = memory_model(cfg, recipe, args.nproc_per_node)
    if args.gpu_memory:
        card = parse_memory_size(args.gpu_memory)
    elif torch.cuda.is_available():
        card = torch.cuda.get_device_properties(0).total_memory
    else:
        card = None
    plan = run_plan(model, cfg, card)
    result = model.estimate(plan)
    print(result.report())
    print("\n".join(policy_lines(model, card)))
    if args.max_seq:
        print(longest_sample_line(model, card))
    if card is None:
        print("No GPU here: pass --gpu-memory (e.g. 24GB) to check a card.")
        return 0
    if result.total <= card:
        print(f"Fits in {gib(card)}, with {gib(card - result.total)} to spare.")
        return 0
    print(f"Does not fit in {gib(card)}: {gib(result.total - card)} short.")
    options = fitting_overrides(cfg, recipe, card, args.nproc_per_node)
    if not options:
        print("No override tunelite knows makes it fit; use a smaller model or a larger card.")
        return 1
    print("Any of these would fit:")
    for extra, fitted in options:
        processes = ["--nproc_per_node", str(args.nproc_per_node)] if args.nproc_per_node > 1 else []
        command = " ".join(["tunelite run", args.recipe, *processes, "--config", args.config,
                            *merge_overrides(overrides, extra)])
        print(f"  {command}   # {gib(fitted.total)}")
    return 1


def run_plan(model: MemoryModel, cfg: Any, card: int | None) -> MemoryPlan:
    """The plan the run would use (tunelite.training.memory_policy.budget_plan, as the recipe
    picks it): the budget's when the config sets memory_budget_gib (and, for `auto`, a card is
    known), else the switches'."""
    import torch

    from tunelite.training.memory_estimate import config_switches_plan
    from tunelite.training.memory_policy import budget_bytes, budget_plan

    budget = cfg.get("memory_budget_gib")
    if budget is not None:
        budget = card if budget == "auto" else budget_bytes(budget, torch.device("meta"))
    return budget_plan(model, config_switches_plan(cfg, model.args.num_layers), budget)[0]


def policy_lines(model: MemoryModel, card: int | None) -> list[str]:
    """Each policy for every layer, and the budget's pick for the card."""
    from tunelite.modules.memory_policy import POLICIES
    from tunelite.training.memory_estimate import MemoryPlan, gib

    tokens = model.batch * model.recipe.sequences_per_sample * model.seq
    lines = [f"By memory policy (batch {model.batch} x {model.seq} tokens):",
             f"  {'policy':<64}{'on the card':>12}{'host':>12}"]
    for policy in POLICIES:
        result = model.estimate(MemoryPlan((policy,) * model.args.num_layers))
        lines.append(f"  {policy + ' every layer':<64}{gib(result.total):>12}{gib(result.pinned_host):>12}")
    if card is not None:
        fitted = model.fastest_plan(card)
        pick = fitted[0].describe(tokens) if fitted else "nothing fits"
        sizes = f"{gib(fitted[1].total):>12}{gib(fitted[1].pinned_host):>12}" if fitted else ""
        lines.append(f"  {'fastest in ' + gib(card) + ': ' + pick:<64}{sizes}")
        lines.append(f"  (what memory_budget_gib: {card / 2**30:g} or auto on this card picks)")
    return lines


def longest_sample_line(model: MemoryModel, card: int | None) -> str:
    """The longest sample, batch 1, that fits the card."""
    from tunelite.training.memory_estimate import gib

    if card is None:
        return "--max-seq needs a card: pass --gpu-memory (e.g. 24GB)."
    found = model.longest_sequence(card)
    if found is None:
        return f"Not even 1024 tokens fit {gib(card)}."
    seq, plan, result = found
    host = f", {gib(result.host_bytes)} of pinned host memory" if result.host_bytes else ""
    return (f"Longest sample that fits {gib(card)} (batch 1): {seq:,} tokens, with {plan.describe(seq)}: "
            f"{gib(result.total)} on the card{host}.")
