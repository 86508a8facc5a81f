"""`muscle score`: score model versions on a task with the Ray Data batch-inference job.

One version:     muscle score --model BASE [--adapter DIR] --task NAME --out DIR
Several:         muscle score --version old=V1 --version new=V2 --version compat=V2:ADAPTER ...
From YAML:       muscle score --config score.yaml [flags override its fields]
"""

from __future__ import annotations

import argparse

import yaml

from muscle_ray.errors import MuscleError
from muscle_ray.scoring.config import ScoreConfig, VersionSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the fields of ScoreConfig (versions, task, out, ...)")
    p.add_argument("--model", help="base model directory (one version, named by --name)")
    p.add_argument("--adapter", help="PEFT adapter directory for --model")
    p.add_argument("--name", default="model", help="version name for --model (output subdirectory)")
    p.add_argument("--version", action="append", metavar="NAME=BASE[:ADAPTER]", default=[],
                   help="a model version; repeat to score several (old, new, compat) in one run")
    p.add_argument("--task", help="task name (see muscle_ray.tasks)")
    p.add_argument("--task-option", action="append", metavar="KEY=VALUE", default=[],
                   help="task option, VALUE parsed as YAML (e.g. max_new_tokens=64)")
    p.add_argument("--data", help="the task's input file in its published format")
    p.add_argument("--data-root", help="directory holding the tasks' default files (e.g. ../shared/data)")
    p.add_argument("--limit", type=int, help="score only the first N records")
    p.add_argument("--out", help="output directory: OUT/<version>/<task>/shard-*.parquet")
    p.add_argument("--backend", choices=["hf", "vllm"])
    p.add_argument("--batch-size", type=int, help="questions or prompts per forward pass (default 8)")
    p.add_argument("--workers", help="actors: N, or MIN,MAX to autoscale (default 1)")
    p.add_argument("--shard-size", type=int, help="input rows per output shard (default 256)")
    p.add_argument("--max-errors", type=int, help="fail when more than N input rows are bad")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each actor asks Ray for (default 0.25)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs each actor asks Ray for (default 0)")


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    versions = [VersionSpec.parse(v) for v in args.version]
    if args.model:
        versions.insert(0, VersionSpec(name=args.name, base=args.model, adapter=args.adapter))
    elif args.adapter:
        raise MuscleError("--adapter needs --model (or use --version NAME=BASE:ADAPTER)")
    task_options = {}
    for kv in args.task_option:
        key, sep, value = kv.partition("=")
        if not sep:
            raise MuscleError(f"--task-option {kv!r}: expected KEY=VALUE")
        task_options[key] = yaml.safe_load(value)
    fields = dict(
        versions=[v.model_dump() for v in versions] or None, task=args.task, task_options=task_options or None,
        data=args.data, data_root=args.data_root, limit=args.limit, out=args.out, backend=args.backend,
        batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
        max_errors=args.max_errors, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
    )
    if args.config:
        return ScoreConfig.from_yaml(args.config, **fields)
    if not versions:
        raise MuscleError("name a model: --model BASE_DIR, --version NAME=BASE[:ADAPTER], or --config FILE")
    return ScoreConfig.build("command line", **{k: v for k, v in fields.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from muscle_ray.scoring.job import run_score

    run_score(config_from_args(args))
    return 0
