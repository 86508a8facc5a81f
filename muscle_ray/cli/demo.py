"""`muscle demo`: `muscle update` in miniature, over a synthetic zoo built on the spot (see muscle_ray/demo.py)."""

from __future__ import annotations

import argparse

from muscle_ray.cli.options import add_config_arguments, load
from muscle_ray.errors import MuscleError


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, what="file with DemoConfig fields (zoo, adapter, compat, tasks, seeds)")
    p.add_argument("--out", help="output folder (default runs/demo)")
    p.add_argument(
        "--mask",
        help="compat masking variant (compat.compat.mask): muscle (default), old_correct, "
        "old, new, token_likelihood, sequence_likelihood",
    )
    p.add_argument(
        "--ablation",
        nargs="?",
        const="sum_mc",
        metavar="TASK",
        help="also train all six masks on TASK (default sum_mc): the paper's Table 7",
    )
    p.add_argument(
        "--seeds", type=_ints, help="comma-separated adapter seeds, e.g. 0,1,2 (mean and spread in the report)"
    )
    p.add_argument("--tasks", help="comma-separated subset of sum_mc,sum_em,story_rouge")
    p.add_argument("--verbose", action="store_true", help="also show Ray's output (always in OUT/logs/ray.log)")


def config_from_args(args: argparse.Namespace):
    from muscle_ray.demo import DemoConfig

    cfg = load(
        DemoConfig,
        args,
        {
            "out": args.out,
            "compat.compat.mask": args.mask,
            "ablation_task": args.ablation,
            "seeds": args.seeds,
            "tasks": args.tasks.split(",") if args.tasks else None,
        },
    )
    if cfg.ablation_task and cfg.ablation_task not in cfg.tasks:
        raise MuscleError(f"ablation_task {cfg.ablation_task}: not one of the demo's tasks {cfg.tasks}")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)

    from muscle_ray import console
    from muscle_ray.demo import run_demo

    with console.setup(cfg.out, verbose=args.verbose) as con:
        run_demo(cfg, con)
    return 0
