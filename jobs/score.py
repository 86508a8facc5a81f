"""Ray job entrypoint: `muscle score` (flags as there; data and out may be s3://, gs://, file:// URIs).

ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/score.yaml
"""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
