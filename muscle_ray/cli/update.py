"""`muscle update`: the whole MUSCLE update for two base versions of any model (see muscle_ray/update.py).

muscle update --config jobs/configs/update.yaml [--out runs/my-update] [--mask ce] [--set control=false]
muscle update --config ... --set select=compat      (each task needs val_data: snapshots chosen on it)
"""

from __future__ import annotations

import argparse

from muscle_ray.cli.options import add_config_arguments, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(
        p,
        what="UpdateConfig (old, new, tasks, adapter, compat, control, snapshot_every, select, adapter_seeds, "
        "variants, scoring); see jobs/configs/update.yaml",
    )
    p.add_argument("--out", help="run folder (out); a rerun into it skips what is finished")
    p.add_argument(
        "--mask",
        help="compat masking variant (compat.compat.mask): muscle (default), old_correct, "
        "old, new, token_likelihood, sequence_likelihood",
    )
    p.add_argument("--verbose", action="store_true", help="also show Ray's output (always in OUT/logs/ray.log)")


def run(args: argparse.Namespace) -> int:
    from muscle_ray.update import UpdateConfig

    cfg = load(UpdateConfig, args, {"out": args.out, "compat.compat.mask": args.mask}).located()

    from muscle_ray import console
    from muscle_ray.update import run_update

    with console.setup(cfg.out, verbose=args.verbose) as con:
        run_update(cfg, con)
    return 0
