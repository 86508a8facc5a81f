"""Evaluation tasks: published files -> `Instance`s; see base.py for the interface.

Every module of this package is imported here, so a new task is one module holding a
`common.FileTask` subclass decorated with `@register`: nothing else to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from muscle_ray.tasks.base import Instance, Record, Task, get_task, register, task_names


def import_modules(package: str, path: list[str]) -> list[str]:
    """Import every module of a package (their `@register` decorators fill the registry)."""
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]
    for name in names:
        importlib.import_module(name)
    return names


import_modules(__name__, __path__)

__all__ = ["Instance", "Record", "Task", "get_task", "import_modules", "register", "task_names"]
