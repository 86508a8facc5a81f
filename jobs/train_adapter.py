"""Ray job entrypoint: train a task LoRA adapter with Ray Train; flags as `muscle train-adapter`.

    python jobs/train_adapter.py --config jobs/configs/train_adapter.yaml [--set optim.lr=2e-3]
    ray job submit --working-dir . -- python jobs/train_adapter.py --config jobs/configs/train_adapter.yaml

What the job adds to `muscle train-adapter` for clusters: relative paths are taken under
MUSCLE_WORKSPACE when it is set (under `ray job submit` the job runs in Ray's unpacked copy of
the code), training data may be a pyarrow URI (fetched to the driver, which tokenizes it) and
`out` may be one (the adapter is exported locally, then copied there).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from muscle_ray.errors import MuscleError
from muscle_ray.locations import copy_location, is_uri
from muscle_ray.training import cli

STAGING = Path(tempfile.gettempdir()) / "muscle-ray-staging"


def run_job(kind: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"jobs/train_{kind}.py", description=f"train a {kind} adapter")
    cli.add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        from muscle_ray.training.config import load_config
        from muscle_ray.training.job import run_training

        given = load_config(args.config, kind, cli.overrides(args))
        cfg, copies = given.located(os.environ.get("MUSCLE_WORKSPACE"), STAGING)
        manifest = run_training(cfg, threads_per_worker=args.threads)
        if is_uri(given.data.path):   # record the data the user named, not its staged copy
            path = Path(cfg.out) / "muscle_manifest.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "data": given.data.path}, indent=2))
        for local, uri in copies:
            copy_location(local, uri)
        print(json.dumps({"out": copies[0][1] if copies else cfg.out, "best_metrics": manifest["best_metrics"]},
                         indent=2))
    except MuscleError as e:
        print(f"jobs/train_{kind}.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_job("adapter", sys.argv[1:]))
