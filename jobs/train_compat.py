"""Train a MUSCLE compatibility adapter: `python jobs/train_compat.py --config jobs/configs/train_compat.yaml`."""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-compat", *sys.argv[1:]]))
