"""`muscle train-adapter` / `muscle train-compat`: a YAML config, a few overrides, one Ray Train run.

    muscle train-adapter --config jobs/configs/train_adapter.yaml [--data train.jsonl] [--set optim.lr=2e-3]
    muscle train-compat  --config jobs/configs/train_compat.yaml  [--set compat.mask=ce]

Training data (`data.path`, `data.val_path`) and `out` may be URIs: the data is fetched to the
driver, which tokenizes it; the adapter is exported locally and copied to `out`. Relative paths
are taken under MUSCLE_WORKSPACE when it is set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from muscle_ray.cli.options import add_config_arguments, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, what="training config (see jobs/configs/train_*.yaml)")
    p.add_argument("--task", help="built-in task name; --data is then that task's file (data.task)")
    p.add_argument("--data", help="training data: JSONL/Parquet with prompt, completion (data.path)")
    p.add_argument("--out", help="adapter output directory or URI (out)")
    p.add_argument("--name", help="Ray Train run name (run.name; the same name resumes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's output (always in the run's logs/ray.log, beside its checkpoints)",
    )


def run(args: argparse.Namespace) -> int:
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

    model = CompatTrainConfig if args.command == "train-compat" else AdapterTrainConfig
    given = load(model, args, {"data.task": args.task, "data.path": args.data, "out": args.out, "run.name": args.name})

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
