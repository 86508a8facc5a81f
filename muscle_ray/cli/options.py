"""What every command that reads settings shares: `--config FILE`, `--set a.b=VALUE`, and
its own flags as shorthands for overrides. Later wins: the file, then --set, then the flags."""

from __future__ import annotations

import argparse
import json
from typing import Any

from muscle_ray.config import Model, load_config, parse_overrides
from muscle_ray.errors import MuscleError


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None, what: str = "config") -> None:
    parser.add_argument(
        "--config",
        default=default,
        metavar="FILE",
        help=f"YAML {what}" + (" (default: %(default)s)" if default else ""),
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one field (repeatable), VALUE read as YAML: --set optim.lr=2e-3",
    )


def overrides(args: argparse.Namespace, flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """--set overrides, then the flags that were given ({"data.path": args.data, ...})."""
    out = parse_overrides(args.overrides)
    out.update({k: v for k, v in (flags or {}).items() if v is not None})
    return out


def load(model: type[Model], args: argparse.Namespace, flags: dict[str, Any] | None = None) -> Model:
    """The command's config: --config, then --set, then its flags, validated by `model`."""
    return load_config(model, args.config, overrides(args, flags))


def json_values(items: list[str], flag: str) -> dict[str, Any]:
    """`["tensor_parallel_size=2", "dtype=bfloat16"]` -> {"tensor_parallel_size": 2, "dtype": "bfloat16"}:
    each value read as JSON where it is JSON (numbers, true, null, {"": 0}), else kept as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise MuscleError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


def number_or_auto(text: str) -> float | str:
    """An argparse type: a number, or "auto" (sized to the machine when the run starts)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None
