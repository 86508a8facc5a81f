"""How every command reads its settings: a YAML file, `a.b=value` overrides, one pydantic model.

The typed configs live beside the code they configure (`ScoreConfig`, `TrainConfig`, ...);
this module is the one path from a file and a command line to such a model, so every
command names a bad setting the same way: one line with the file and the dotted field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from muscle_ray.errors import MuscleError

Model = TypeVar("Model", bound=BaseModel)


def load_config(model: type[Model], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Model:
    """`model` from the YAML file at `path` (none: only the overrides), with `overrides`
    ({"optim.lr": 2e-3, ...}) applied on top, validated."""
    source = str(path) if path else "command line"
    raw = read_yaml(path) if path else {}
    return validated(model, with_overrides(raw, overrides or {}, source), source)


def read_yaml(path: str | Path) -> dict:
    """A YAML file holding a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    if not p.is_file():
        raise MuscleError(f"{p}: config file not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MuscleError(f"{p}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise MuscleError(f"{p}: a config is a mapping of fields, not a {type(doc).__name__}")
    return doc


def parse_overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """`["optim.lr=2e-3", "compat.mask=ce"]` -> {"optim.lr": 0.002, "compat.mask": "ce"};
    each value is read as YAML, so numbers, booleans, lists and null keep their type."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise MuscleError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise MuscleError(f"{flag} {item!r}: the value is not valid YAML") from None
        out[key] = float(value) if isinstance(value, str) and _EXPONENT.match(value) else value
    return out


# PyYAML reads 2e-3 (no dot) as a string, as YAML 1.1 says; on a command line it is a number.
_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def with_overrides(raw: dict, overrides: dict[str, Any], source: str = "config") -> dict:
    """A copy of `raw` with each dotted key set (`versions.0.base` indexes a list)."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node: Any = raw
        for i, part in enumerate(parents):
            node = _child(node, part, key, ".".join(parents[: i + 1]), source)
        _set(node, leaf, value, key, source)
    return raw


def _child(node, part: str, key: str, where: str, source: str):
    if isinstance(node, list):
        return _index(node, part, key, source)
    if node.get(part) is None:
        node[part] = {}
    if not isinstance(node[part], (dict, list)):
        raise MuscleError(f"{source}: cannot set '{key}': '{where}' is a {type(node[part]).__name__}, not a mapping")
    return node[part]


def _set(node, leaf: str, value, key: str, source: str) -> None:
    if isinstance(node, list):
        _index(node, leaf, key, source)  # only an item that is there
        node[int(leaf)] = value
    else:
        node[leaf] = value


def _index(node: list, part: str, key: str, source: str):
    if not part.isdigit() or int(part) >= len(node):
        raise MuscleError(f"{source}: cannot set '{key}': no item {part} in a list of {len(node)}")
    return node[int(part)]


def validated(model: type[Model], raw: dict, source: str = "config") -> Model:
    """`model.model_validate(raw)`, with pydantic's report as one MuscleError line."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise MuscleError(f"{source}: {describe(e)}") from None


def describe(error: ValidationError) -> str:
    """The first problem, naming its dotted field (`versions[0].base`), and how many more."""
    errors = error.errors()
    first = errors[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"field '{field}': {msg}" if field else msg) + more
