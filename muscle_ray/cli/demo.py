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


def _ints_or_none(text: str) -> list[int]:
    return [] if text.strip().lower() == "none" else _ints(text)


def _pairs(text: str) -> list[tuple[int, int]]:
    """`3:5,1:2` -> [(3, 5), (1, 2)]."""
    try:
        return [(int(a), int(b)) for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected V1SEED:V2SEED pairs separated by commas, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(
        p, what="file with DemoConfig fields (zoo, adapter, compat, tasks, seeds, adapter_seeds, base_seeds, select)"
    )
    p.add_argument("--out", help="output folder (default runs/demo)")
    p.add_argument(
        "--mask",
        help="compat masking variant (compat.compat.mask): muscle (default), old_correct, "
        "old, new, token_likelihood, sequence_likelihood",
    )
    p.add_argument(
        "--ablation",
        nargs="?",
        const="",
        metavar="TASK",
        help="also train the paper's Table 7 masks on TASK (default: the multiple-choice task)",
    )
    p.add_argument(
        "--seeds", type=_ints, help="comma-separated adapter seeds, e.g. 0,1,2 (mean and spread in the report)"
    )
    p.add_argument(
        "--adapter-seeds",
        type=_ints_or_none,
        help="more v1/v2 task adapter seeds, e.g. 1 (default) or 1,2, or none: how much the flips overlap across seeds",
    )
    p.add_argument(
        "--base-seeds",
        type=_pairs,
        metavar="A:B,C:D",
        help="pairs of (v1, v2) base seeds: a zoo and an update each, McNemar pooled over them "
        "(default: the zoo's own seeds)",
    )
    p.add_argument("--tasks", help="comma-separated subset of the demo's tasks (muscle_ray/demo.py SCORING)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's output (always in OUT/logs/ray.log)")


def config_from_args(args: argparse.Namespace):
    from muscle_ray.demo import SCORING, DemoConfig

    if args.ablation == "":  # --ablation without a task: the multiple-choice one
        args.ablation = next(t for t, (task, _, _) in SCORING.items() if task == "mc_jsonl")

    cfg = load(
        DemoConfig,
        args,
        {
            "out": args.out,
            "compat.compat.mask": args.mask,
            "ablation_task": args.ablation,
            "seeds": args.seeds,
            "adapter_seeds": args.adapter_seeds,
            "base_seeds": args.base_seeds,
            "tasks": args.tasks.split(",") if args.tasks else None,
        },
    )
    if cfg.ablation_task and cfg.ablation_task not in cfg.tasks:
        raise MuscleError(f"ablation_task {cfg.ablation_task}: not one of the demo's tasks {cfg.tasks}")
    cfg.check()  # the update it writes, before the console and Ray start
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)

    from muscle_ray import console
    from muscle_ray.demo import run_demo

    with console.setup(cfg.out, verbose=args.verbose) as con:
        run_demo(cfg, con)
    return 0
