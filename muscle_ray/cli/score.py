"""`muscle score`: score model versions on a task with the Ray Data batch-inference job.

One version:     muscle score --model BASE [--adapter DIR] --task NAME --out DIR
Several:         muscle score --version old=V1 --version new=V2 --version compat=V2:ADAPTER ...
From YAML:       muscle score --config score.yaml [--set batch_size=16] [flags override its fields]

The actor pool fills what Ray has unless told otherwise (`scoring/placement.py`): on this machine
one actor per CPU (one torch thread each) or per GPU; on a cluster 1..N actors, autoscaling.
`--workers`, `--cpus-per-worker`, `--gpus-per-worker` override it; `--backend-option KEY=VALUE`
sets engine options (hf: dtype, device_map, attn_implementation; vllm: tensor_parallel_size,
gpu_memory_utilization, max_model_len, enforce_eager, dtype).

`--data` and `--out` may be URIs (s3://, gs://, file://): the data is fetched, the shards are
written locally and copied to `--out` when the run ends, also after a failure (a rerun into the
same `--out` fetches them back and resumes). Relative paths are taken under MUSCLE_WORKSPACE.
"""

from __future__ import annotations

import argparse

from muscle_ray.cli.options import add_config_arguments, json_values, load, number_or_auto
from muscle_ray.errors import MuscleError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, what="file with the fields of ScoreConfig (versions, task, out, ...)")
    p.add_argument("--model", help="base model directory (one version, named by --name)")
    p.add_argument("--adapter", help="PEFT adapter directory for --model")
    p.add_argument("--name", default="model", help="version name for --model (output subdirectory)")
    p.add_argument(
        "--version",
        action="append",
        metavar="NAME=BASE[:ADAPTER]",
        default=[],
        help="a model version; repeat to score several (old, new, compat) in one run",
    )
    p.add_argument("--task", help="task name (`muscle tasks` lists them)")
    p.add_argument(
        "--task-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="task option, VALUE parsed as YAML (e.g. max_new_tokens=64)",
    )
    p.add_argument("--data", help="the task's input file in its published format (path or URI)")
    p.add_argument("--data-root", help="directory holding the tasks' default files (e.g. ../shared/data)")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument("--out", help="output directory or URI: OUT/<version>/<task>/shard-*.parquet")
    p.add_argument("--backend", choices=["hf", "vllm"])
    p.add_argument(
        "--backend-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="engine option, VALUE parsed as JSON where it is (e.g. dtype=bfloat16, tensor_parallel_size=2)",
    )
    p.add_argument("--batch-size", type=int, help="questions or prompts per forward pass (default 8)")
    p.add_argument("--workers", help="actors: N, MIN,MAX to autoscale, or auto (default: sized to what Ray has)")
    p.add_argument("--shard-size", type=int, help="input rows per output shard (default 256)")
    p.add_argument("--max-errors", type=int, help="fail when more than N input rows are bad")
    p.add_argument(
        "--cpus-per-worker",
        type=number_or_auto,
        help="CPUs each actor asks Ray for; its torch threads: this, rounded (default: auto)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=number_or_auto,
        help="GPUs each actor asks Ray for (default: auto, 1 per actor where Ray has GPUs; vllm: tensor_parallel_size)",
    )
    p.add_argument("--verbose", action="store_true", help="also show Ray's output (always in OUT/logs/ray.log)")


def config_from_args(args: argparse.Namespace):
    from muscle_ray.config import parse_overrides
    from muscle_ray.scoring.config import ScoreConfig, VersionSpec

    versions = [VersionSpec.parse(v) for v in args.version]
    if args.model:
        versions.insert(0, VersionSpec(name=args.name, base=args.model, adapter=args.adapter))
    elif args.adapter:
        raise MuscleError("--adapter needs --model (or use --version NAME=BASE:ADAPTER)")
    flags = {
        "versions": [v.model_dump() for v in versions] or None,
        "task": args.task,
        "data": args.data,
        "data_root": args.data_root,
        "limit": args.limit,
        "out": args.out,
        "backend": args.backend,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "shard_size": args.shard_size,
        "max_errors": args.max_errors,
        "cpus_per_worker": args.cpus_per_worker,
        "gpus_per_worker": args.gpus_per_worker,
    }
    options = parse_overrides(args.task_option, flag="--task-option")
    flags.update({f"task_options.{k}": v for k, v in options.items()})
    engine = json_values(args.backend_option, flag="--backend-option")
    flags.update({f"backend_options.{k}": v for k, v in engine.items()})
    if not (args.config or versions or any(s.startswith("versions") for s in args.overrides)):
        raise MuscleError("name a model: --model BASE_DIR, --version NAME=BASE[:ADAPTER], or --config FILE")
    return load(ScoreConfig, args, flags)


def run(args: argparse.Namespace) -> int:
    given = config_from_args(args)  # a bad setting fails here, before Ray is imported

    from muscle_ray import console
    from muscle_ray.locations import staged
    from muscle_ray.scoring.job import run_score

    with staged(given) as cfg, console.setup(cfg.out, verbose=args.verbose) as con:
        with con.stage(f"score {', '.join(v.name for v in cfg.versions)} on {cfg.task}", unit="rows") as stage:
            summaries = run_score(cfg, log=con.log, progress=stage.advance)
        for s in summaries:
            con.line(f"{s.version}: {s.rows} rows in {s.out} ({s.scored} scored now, {s.errors} bad rows skipped)")
    return 0
