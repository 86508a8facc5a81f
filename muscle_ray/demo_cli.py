"""`muscle demo`: the whole MUSCLE update end to end (see muscle_ray/demo.py)."""

from __future__ import annotations

import argparse

import yaml

from muscle_ray.errors import MuscleError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default runs/demo)")
    p.add_argument("--config", help="YAML with DemoConfig fields (zoo, adapter, compat, tasks, seeds)")
    p.add_argument("--mask", help="compat masking variant: muscle (default), old_correct, old, new, "
                                  "token_likelihood, sequence_likelihood")
    p.add_argument("--ablation", nargs="?", const="sum_mc", metavar="TASK",
                   help="also train all six masks on TASK (default sum_mc): the paper's Table 7")
    p.add_argument("--seeds", help="comma-separated adapter seeds, e.g. 0,1,2 (mean and spread in the report)")
    p.add_argument("--tasks", help="comma-separated subset of sum_mc,sum_em,story_rouge")


def build_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from muscle_ray.demo import DemoConfig

    raw = {}
    if args.config:
        try:
            raw = yaml.safe_load(open(args.config)) or {}
        except (OSError, yaml.YAMLError) as e:
            raise MuscleError(f"{args.config}: cannot read demo config ({e})") from None
    if args.out:
        raw["out"] = args.out
    if args.mask:
        raw.setdefault("compat", {})["mask"] = args.mask
    if args.ablation:
        raw["ablation_task"] = args.ablation
    if args.seeds:
        try:
            raw["seeds"] = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise MuscleError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if args.tasks:
        raw["tasks"] = args.tasks.split(",")
    try:
        cfg = DemoConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise MuscleError(f"demo config: field '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
    if cfg.ablation_task and cfg.ablation_task not in cfg.tasks:
        raise MuscleError(f"--ablation {cfg.ablation_task}: not one of the demo's tasks {cfg.tasks}")
    return cfg


def run(args: argparse.Namespace) -> int:
    from muscle_ray.demo import run_demo

    run_demo(build_config(args))
    return 0
