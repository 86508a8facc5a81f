"""Ray job entrypoint: score model versions (Ray Data + an autoscaling actor pool); flags as `muscle score`.

    python jobs/score.py --config jobs/configs/score.yaml [--workers 1,8] [--out s3://bucket/run]
    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/score.yaml

What the job adds to `muscle score` for clusters: relative paths are taken under
MUSCLE_WORKSPACE when it is set (under `ray job submit` the job runs in Ray's unpacked copy of
the code), and `data` / `out` may be pyarrow URIs (s3://, gs://, file://): the data is fetched
to the driver, the shards are written locally and copied to `out` when the run ends (also when it
fails: a rerun into the same `out` fetches them back and resumes).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from muscle_ray.errors import MuscleError
from muscle_ray.locations import copy_location
from muscle_ray.scoring import cli

STAGING = Path(tempfile.gettempdir()) / "muscle-ray-staging"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jobs/score.py", description=__doc__.splitlines()[0])
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        from muscle_ray.scoring.job import run_score

        cfg, copies = cli.config_from_args(args).located(os.environ.get("MUSCLE_WORKSPACE"), STAGING)
        try:
            run_score(cfg)
        finally:   # also after a failure: finished shards are whole files, so a rerun resumes from them
            for local, uri in copies:
                if Path(local).exists():
                    copy_location(local, uri)
                    print(f"copied {local} -> {uri}")
    except MuscleError as e:
        print(f"jobs/score.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
