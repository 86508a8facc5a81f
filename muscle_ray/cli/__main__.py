"""`python -m muscle_ray.cli ...`, the same as the `muscle` console script."""

import sys

from muscle_ray.cli import main

sys.exit(main())
