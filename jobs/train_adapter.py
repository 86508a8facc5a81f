"""Train a task LoRA adapter: `python jobs/train_adapter.py --config jobs/configs/train_adapter.yaml`."""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-adapter", *sys.argv[1:]]))
