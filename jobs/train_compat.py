"""Ray job entrypoint: train a MUSCLE compatibility adapter; flags as `muscle train-compat`.

    python jobs/train_compat.py --config jobs/configs/train_compat.yaml [--set compat.mask=ce]
    ray job submit --working-dir . -- python jobs/train_compat.py --config jobs/configs/train_compat.yaml

Locations as in jobs/train_adapter.py: MUSCLE_WORKSPACE for relative paths, URIs for data and out.
"""

import sys

from train_adapter import run_job   # jobs/ is on sys.path when this file runs as a script

if __name__ == "__main__":
    sys.exit(run_job("compat", sys.argv[1:]))
