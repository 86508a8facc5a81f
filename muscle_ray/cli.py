"""`muscle`: one console script, one subcommand per job; each lives in its own module.

Each module named here defines `add_arguments(parser)` and `run(args) -> int`. They are
imported only when their subcommand runs, so `muscle flips` never pays for importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from muscle_ray.errors import MuscleError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "train-adapter": ("muscle_ray.training.cli_adapter", "train a task LoRA adapter with Ray Train (YAML config)"),
    "train-compat": ("muscle_ray.training.cli_compat", "train a MUSCLE compatibility adapter with Ray Train (YAML config)"),
    "score": ("muscle_ray.scoring.cli", "score model versions on a task with a Ray Data actor pool (results-format Parquet)"),
    "flips": ("muscle_ray.metrics.cli", "negative/positive flips, paired statistics and compat deltas between result sets"),
    "serve": ("muscle_ray.serving.cli", "host old/new/compat behind an OpenAI-compatible API with a compare endpoint (Ray Serve)"),
    "demo": ("muscle_ray.demo_cli", "the whole MUSCLE update end to end: zoo, adapters, flips, compat, report"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="muscle", description="Compatible LLM updates (MUSCLE) on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"muscle {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except MuscleError as e:
        print(f"muscle {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
