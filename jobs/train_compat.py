"""Ray job entrypoint: `muscle train-compat` (flags as there; data and out may be URIs).

ray job submit --working-dir . -- python jobs/train_compat.py --config jobs/configs/train_compat.yaml
"""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-compat", *sys.argv[1:]]))
