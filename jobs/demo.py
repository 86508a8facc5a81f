"""Ray job entrypoint: the whole MUSCLE update end to end (`make demo`, `muscle demo`).

python jobs/demo.py --out runs/demo [--mask muscle] [--ablation home_mc] [--seeds 0,1,2]
"""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
