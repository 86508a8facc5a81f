"""`muscle train-adapter` / `muscle train-compat`: a YAML config, a few overrides, one Ray Train run.

    muscle train-adapter --config jobs/configs/train_adapter.yaml [--data train.jsonl] [--set optim.lr=2e-3]
    muscle train-compat  --config jobs/configs/train_compat.yaml  [--set compat.mask=ce] [--snapshot-every 60]

The exported adapter is the checkpoint of the best validation loss. Choosing a compat snapshot
for compatibility instead needs v1 and v2 scored on validation data, which is the update
pipeline's work: `muscle update --set select=compat` (`--select compat` here says so).

Training data (`data.path`, `data.val_path`) and `out` may be URIs: the data is fetched to the
driver, which tokenizes it; the adapter is exported locally and copied to `out`. Relative paths
are taken under MUSCLE_WORKSPACE when it is set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from muscle_ray.cli.options import add_config_arguments, load
from muscle_ray.errors import MuscleError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, what="training config (see jobs/configs/train_*.yaml)")
    p.add_argument("--task", help="built-in task name; --data is then that task's file (data.task)")
    p.add_argument("--data", help="training data: JSONL/Parquet with prompt, completion (data.path)")
    p.add_argument("--out", help="adapter output directory or URI (out)")
    p.add_argument("--name", help="Ray Train run name (run.name; the same name resumes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--snapshot-every",
        type=int,
        metavar="K",
        help="also export the adapter every K steps to OUT/snapshots/step-N/ (run.snapshot_every_steps)",
    )
    p.add_argument(
        "--select",
        choices=["loss", "compat"],
        default="loss",
        help="which checkpoint is exported: loss (the best validation loss); compat is muscle update's "
        "(--set select=compat: snapshots scored against v1 and v2 on validation data)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's output (always in the run's logs/ray.log, beside its checkpoints)",
    )


def run(args: argparse.Namespace) -> int:
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

    if args.select == "compat":
        raise MuscleError(
            "--select compat scores snapshots against v1 and v2 on validation data, which muscle update does: "
            "muscle update --config FILE --set select=compat (val_data for each task)"
        )
    model = CompatTrainConfig if args.command == "train-compat" else AdapterTrainConfig
    flags = {"data.task": args.task, "data.path": args.data, "out": args.out, "run.name": args.name}
    given = load(model, args, {**flags, "run.snapshot_every_steps": args.snapshot_every})

    from muscle_ray import console
    from muscle_ray.locations import is_uri, staged
    from muscle_ray.training.job import run_training

    with staged(given) as cfg, console.setup(_run_dir(cfg), verbose=args.verbose) as con:
        with con.stage(f"train {cfg.run.name}", total=cfg.optim.max_steps) as stage:
            manifest = run_training(cfg, threads_per_worker=args.threads, progress=stage.reporter("rank 0"))
        if is_uri(given.data.path):  # record the data the user named, not its staged copy
            path = Path(cfg.out) / "muscle_manifest.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "data": given.data.path}, indent=2))
    out = given.out if is_uri(given.out) else cfg.out
    print(json.dumps({"out": out, "best_metrics": manifest["best_metrics"]}, indent=2))
    return 0


def _run_dir(cfg) -> Path:
    """The folder for this run's log: its Ray Train run folder, beside the checkpoints (or, when
    those go to a URI, beside the adapter as exported locally)."""
    from muscle_ray.locations import is_uri

    if is_uri(cfg.run.storage_path):
        return Path(cfg.out).parent
    return Path(cfg.run.storage_path) / cfg.run.name
