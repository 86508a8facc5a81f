"""`muscle plan`: memory per worker of a training or scoring job, from the model's config.json alone.

    muscle plan --config jobs/configs/train_compat.yaml [--workers 2] [--dtype bf16] [--checkpointing]
    muscle plan --config jobs/configs/score.yaml --device-memory 80GiB --json

The config is what `muscle train-adapter`, `train-compat` (a `compat:` section) or `muscle score`
(a `versions:` list) take; no weights are read. A training config's `run.precision`,
`run.activation_checkpointing` ("auto" resolved as the loop does) and `run.num_workers` are the
defaults of --dtype, --checkpointing and --workers; the plan says where each came from.
`--device-memory` adds the smallest placement that fits: FSDP workers, activation checkpointing,
the compat teacher inline, sharded or offloaded.
How each line is estimated: muscle_ray/plan.py.
"""

from __future__ import annotations

import argparse
import json

from muscle_ray.cli.options import add_config_arguments, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, what="config of `muscle train-adapter`, `train-compat` or `score`")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        help="base and teacher weights (default: run.precision for training, as muscle-ray loads for scoring)",
    )
    p.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        help="activation checkpointing (default: run.activation_checkpointing, auto resolved as the loop does)",
    )
    p.add_argument("--workers", type=int, help="training workers (default: run.num_workers; >1 is FSDP)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.max_length; scoring 512)")
    p.add_argument("--device-memory", metavar="SIZE", help="e.g. 80GiB: print the smallest placement that fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def config_of(args: argparse.Namespace):
    """The config's type from its fields: `versions` = scoring, `compat` = the compat job."""
    from muscle_ray.config import read_yaml
    from muscle_ray.errors import MuscleError
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

    if not args.config:
        raise MuscleError("--config FILE is required (a training or scoring config)")
    keys = set(read_yaml(args.config)) | {s.split("=", 1)[0].split(".", 1)[0] for s in args.overrides}
    model = ScoreConfig if "versions" in keys else CompatTrainConfig if "compat" in keys else AdapterTrainConfig
    return load(model, args)


def run(args: argparse.Namespace) -> int:
    from muscle_ray.errors import MuscleError
    from muscle_ray.plan import parse_bytes, placement, plan_scoring, plan_training

    if args.workers is not None and args.workers < 1:
        raise MuscleError("--workers must be at least 1")
    cfg = config_of(args)
    scoring = not hasattr(cfg, "optim")
    if scoring:
        plan = plan_scoring(cfg, dtype=args.dtype, seq_len=args.seq_len, workers=args.workers)
    else:
        plan = plan_training(
            cfg, dtype=args.dtype, checkpointing=args.checkpointing, workers=args.workers, seq_len=args.seq_len
        )
    fit = None
    if args.device_memory:
        memory = parse_bytes(args.device_memory)
        kw = dict(dtype=args.dtype, seq_len=args.seq_len)
        fit = {"device_memory": memory, **placement(cfg, memory, checkpointing=args.checkpointing, **kw)}
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "placement": fit}, indent=2))
        return 0
    print_plan(plan, fit)
    return 0


def _source(settings: dict, name: str) -> str:
    """Where a training setting came from, e.g. " (config run.precision)"; scoring's say nothing."""
    where = settings.get(f"{name}_from")
    return f" ({where})" if where else ""


def print_plan(plan, fit: dict | None) -> None:
    from muscle_ray.plan import human

    a, p, s = plan.arch, plan.params, plan.settings
    head = "tied" if a["tied"] else f"{p['lm_head']:,}"
    print(f"muscle plan: {plan.kind} of {plan.model}")
    print(
        f"  {a['model_type']}: {a['layers']} layers, hidden {a['hidden']}, heads {a['heads']}/{a['kv_heads']} KV, "
        f"intermediate {a['intermediate']}, vocab {a['vocab']}; {p['total']:,} params "
        f"(embeddings {p['embeddings']:,}, attention {p['attention']:,}, mlp {p['mlp']:,}, norms {p['norms']:,}, "
        f"lm_head {head})"
    )
    shape = f"micro-batch {s['micro_batch']}" if "micro_batch" in s else f"batch {s['batch']}"
    workers = f"{s['workers']} worker" + ("s" if s["workers"] > 1 else "") + _source(s, "workers")
    dtype = f"{s['dtype']}{_source(s, 'dtype')} on {s['device']}"
    extra = [workers, s.get("strategy"), dtype, f"{shape} x {s['seq_len']} tokens"]
    if "checkpointing" in s:
        ckpt = "activation checkpointing" if s["checkpointing"] else "no activation checkpointing"
        extra.append(ckpt + _source(s, "checkpointing"))
    if s.get("teacher"):
        extra.append(f"teacher {s['teacher']}")
    print("  " + ", ".join(x for x in extra if x))
    print()
    width = max(len(part.name) for part in plan.parts)
    print(f"  {'part':<{width}}  {'per worker':>11}  detail")
    for part in plan.parts:
        detail = part.note + (", sharded" if part.sharded else "")
        print(f"  {part.name:<{width}}  {human(part.bytes):>11}  {detail}")
    print(f"  {'total':<{width}}  {human(plan.total):>11}")
    if fit is None:
        return
    print()
    memory = human(fit["device_memory"])
    if "workers_per_device" in fit:
        n = fit["workers_per_device"]
        print(f"  {memory} per device: " + (f"fits, {n} actor(s) per device" if n else "does not fit one device"))
    elif fit["fits"]:
        ckpt = "with" if fit["checkpointing"] else "without"
        workers = "1 worker" if fit["workers"] == 1 else f"{fit['workers']} FSDP workers"
        teacher = f", teacher {fit['teacher']}" if plan.kind == "train-compat" else ""
        print(
            f"  {memory} per device: fits on {workers} {ckpt} activation checkpointing{teacher} "
            f"({human(fit['per_worker'])} per worker)"
        )
    else:
        print(f"  {memory} per device: no placement of up to {fit['max_workers']} workers fits")
