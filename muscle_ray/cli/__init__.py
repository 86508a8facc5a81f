"""`muscle`: one console script; each subcommand is one small module in this package.

A command module defines `add_arguments(parser)` and `run(args) -> int`. It is imported only
when its subcommand runs, so `muscle flips` never pays for importing Ray. Every command that
reads settings takes `--config FILE` and `--set a.b=VALUE` (see `options.py`); a problem the
user can fix (`MuscleError`) is printed here as one line, `muscle CMD: error: ...`, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

from muscle_ray.errors import MuscleError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "score": (
        "muscle_ray.cli.score",
        "score model versions on a task with a Ray Data actor pool (results-format Parquet)",
    ),
    "flips": (
        "muscle_ray.cli.flips",
        "negative/positive flips, paired statistics and compat deltas between result sets",
    ),
    "train-adapter": ("muscle_ray.cli.train", "train a task LoRA adapter with Ray Train"),
    "train-compat": ("muscle_ray.cli.train", "train a MUSCLE compatibility adapter with Ray Train"),
    "serve": (
        "muscle_ray.cli.serve",
        "host old/new/compat behind an OpenAI-compatible API with a compare endpoint (Ray Serve)",
    ),
    "update": (
        "muscle_ray.cli.update",
        "a whole MUSCLE update of two base models: task adapters, flips, compat, report, serve.yaml",
    ),
    "demo": ("muscle_ray.cli.demo", "the whole MUSCLE update end to end: zoo, adapters, flips, compat, report"),
    "tasks": ("muscle_ray.cli.tasks", "list the registered tasks, their kind and metric"),
    "plan": ("muscle_ray.cli.plan", "memory per worker of a training or scoring config, and a placement that fits"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # help, --version, or the "invalid choice" error: exits
    name = argv[0]
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"muscle {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.command = name
    try:
        return int(module.run(args) or 0)
    except MuscleError as e:
        message = " ".join(str(e).split("\n"))
        print(f"muscle {name}: error: {message}", file=sys.stderr)
        return 2


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muscle", description="Compatible LLM updates (MUSCLE) on Ray.")
    parser.add_argument("--version", action="version", version=f"muscle {version('muscle-ray')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser
