"""Training recipes, defined once: YAML files in TrainConfig's shape, without the paths.

A training config names one (`recipe: task_adapter`) and adds what is particular to a run:
base, out, data files, run name. Its own fields win over the recipe's (a deep merge), so the
demo and the example configs in jobs/configs/ train with the same numbers from one file.
A recipe may itself name a recipe it builds on (compat continues the task adapter).
"""

from __future__ import annotations

import copy
from importlib import resources

import yaml


def names() -> list[str]:
    return sorted(f.name.removesuffix(".yaml") for f in resources.files(__name__).iterdir() if f.name.endswith(".yaml"))


def load(name: str) -> dict:
    """The recipe `name` with the recipes it builds on merged under it."""
    if name not in names():
        raise ValueError(f"recipe '{name}': no such recipe (known: {', '.join(names())})")
    raw = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text()) or {}
    return with_recipe(raw)


def with_recipe(raw: dict) -> dict:
    """`raw` with the recipe it names (`recipe: NAME`) filled in under its own fields."""
    if "recipe" not in raw:
        return raw
    raw = dict(raw)
    return merge(load(raw.pop("recipe")), raw)


def merge(base: dict, *overrides: dict) -> dict:
    """A copy of `base` with each override's fields set on top, mappings merged key by key."""
    out = copy.deepcopy(base)
    for over in overrides:
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out
