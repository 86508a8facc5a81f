"""Ray job entrypoint: `muscle update` (flags as there).

ray job submit --working-dir . -- python jobs/update.py --config jobs/configs/update.yaml
"""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["update", *sys.argv[1:]]))
