"""`muscle train-adapter` / `muscle train-compat`: a YAML config, a few overrides, one Ray Train run."""

from __future__ import annotations

import argparse
import json

import yaml

from muscle_ray.errors import MuscleError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("--task", help="built-in task name; --data is then that task's file")
    parser.add_argument("--data", help="training data: JSONL/Parquet with prompt, completion (overrides data.path)")
    parser.add_argument("--out", help="adapter output directory (overrides out)")
    parser.add_argument("--name", help="Ray Train run name (overrides run.name; same name resumes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any field, e.g. --set optim.lr=2e-3 --set compat.mask=ce")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")


def overrides(args) -> dict:
    out = {}
    for item in args.set:
        if "=" not in item:
            raise MuscleError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    for key, value in (("data.task", args.task), ("data.path", args.data), ("out", args.out),
                       ("run.name", args.name)):
        if value is not None:
            out[key] = value
    return out


def run_kind(args, kind: str) -> int:
    from muscle_ray.training.config import load_config
    from muscle_ray.training.job import run_training

    cfg = load_config(args.config, kind, overrides(args))
    manifest = run_training(cfg, threads_per_worker=args.threads)
    print(json.dumps({"out": cfg.out, "best_metrics": manifest["best_metrics"]}, indent=2))
    return 0
