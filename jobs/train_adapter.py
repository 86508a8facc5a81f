"""Ray job entrypoint: `muscle train-adapter` (flags as there; data and out may be URIs).

ray job submit --working-dir . -- python jobs/train_adapter.py --config jobs/configs/train_adapter.yaml
"""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-adapter", *sys.argv[1:]]))
