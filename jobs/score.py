"""Score model versions on a task at scale (Ray Data + an actor pool); same flags as `muscle score`.

    python jobs/score.py --model BASE --task hellaswag --data FILE --out runs/hs --workers 1,4
"""

import sys

from muscle_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
