"""`muscle tasks`: the tasks `muscle score --task` knows, with their kind and metric."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from muscle_ray.tasks import get_task, task_names

    rows = [(name, task.kind, task.metric, summary(task)) for name in task_names() for task in [get_task(name)]]
    width = max(len(r[0]) for r in rows)
    for name, kind, metric, doc in rows:
        print(f"{name:<{width}}  {kind:<3}  {metric:<7}  {doc}")
    return 0


def summary(task) -> str:
    """The first line of the task's docstring, else of its module's, without the `name`: prefix."""
    doc = type(task).__dict__.get("__doc__") or sys.modules[type(task).__module__].__doc__ or ""
    line = doc.strip().splitlines()[0] if doc.strip() else ""
    line = line.split(": ", 1)[1] if line.startswith("`") and ": " in line else line
    return line[:1].upper() + line[1:]
