"""`muscle train-compat`: train a MUSCLE compatibility adapter with Ray Train."""

from muscle_ray.training.cli import add_common_arguments as add_arguments, run_kind


def run(args) -> int:
    return run_kind(args, "compat")


__all__ = ["add_arguments", "run"]
