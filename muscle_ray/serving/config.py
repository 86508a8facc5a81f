"""What the serving app hosts and how, typed and validated (pydantic).

It is the `args:` block of the application in `serve/config.yaml` (Ray Serve's config-file
format), so `serve run serve/config.yaml` and `muscle serve` read the same thing::

    bases:                        # one deployment per base: the base is loaded once
      v1: {path: runs/demo/zoo/v1, models: {old: runs/demo/adapters/pet_em/v1}}
      v2: {path: runs/demo/zoo/v2, models: {new: runs/demo/adapters/pet_em/v2,
                                            compat: runs/demo/adapters/pet_em/compat}}
    compare: {old: old, new: new}
    shadow: {enabled: false, pairs: {new: old, compat: old}, out: runs/serve/shadow}

A model maps to an adapter directory, or to null for the base alone. Relative paths are taken
from the directory the app is built in (where `serve run` / `muscle serve` is launched).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from muscle_ray.config import read_yaml, validated, with_overrides
from muscle_ray.errors import MuscleError
from muscle_ray.model_sources import ModelName
from muscle_ray.models import ModelVersion

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def model_deployment_name(base_key: str) -> str:
    return f"model_{base_key}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSpec(_Strict):
    """One base model directory and the models served on it (name -> adapter dir or null)."""

    path: ModelName
    models: dict[str, str | None] = Field(min_length=1)


class Limits(_Strict):
    """Request limits; anything beyond is answered 400 naming the field (413 for the body).

    The size limits are checked before any parsing or tokenising, so an oversized request
    costs the server almost nothing: the body in bytes, then each prompt in characters.
    """

    max_body_bytes: int = Field(2 * 1024 * 1024, gt=0)  # a request's JSON body
    max_prompt_chars: int = Field(32_768, gt=0)  # a prompt (or a chat's messages), before tokenising
    max_prompt_tokens: int = Field(1024, gt=0)
    max_tokens: int = Field(128, ge=0)
    max_prompts: int = Field(16, gt=0)  # prompts in one /v1/completions request
    max_choices: int = Field(16, gt=1)  # options in one multiple-choice /v1/compare request
    max_logprobs: int = Field(5, ge=0)  # top alternatives per token
    max_stops: int = Field(4, ge=0)


class ComparePair(_Strict):
    """The default pair of /v1/compare (a request may name another `new`, e.g. compat)."""

    old: str = "old"
    new: str = "new"


class ShadowConfig(_Strict):
    """Shadow mode: a request to a key of `pairs` is also sent to its value in the background."""

    enabled: bool = False
    pairs: dict[str, str] = {"new": "old", "compat": "old"}
    out: str = "runs/serve/shadow"
    flush_rows: int = Field(64, gt=0)  # disagreements per Parquet file
    flush_seconds: float = Field(10.0, gt=0)  # ... or fewer, once the oldest waited this long


class BatchConfig(_Strict):
    """@serve.batch settings of the model deployments (requests are grouped by adapter)."""

    max_batch_size: int = Field(8, gt=0)
    batch_wait_timeout_s: float = Field(0.005, ge=0)


class ServeAppConfig(_Strict):
    bases: dict[str, BaseSpec] = Field(min_length=1)
    compare: ComparePair = ComparePair()
    shadow: ShadowConfig = ShadowConfig()
    limits: Limits = Limits()
    batch: BatchConfig = BatchConfig()
    backend: Literal["hf", "vllm"] = "hf"
    backend_options: dict[str, Any] = {}  # vLLM: e.g. {enforce_eager: true, max_model_len: 2048}
    api_key_env: str | None = "MUSCLE_API_KEY"  # bearer token checked when this variable is set

    @model_validator(mode="after")
    def _check(self):
        seen: dict[str, str] = {}
        for key, base in self.bases.items():
            if not re.match(_NAME, key):
                raise ValueError(f"bases.{key}: a base key is letters, digits, '_', '.', '-'")
            for name in base.models:
                if not re.match(_NAME, name):
                    raise ValueError(f"bases.{key}.models.{name}: a model name is letters, digits, '_', '.', '-'")
                if name in seen:
                    raise ValueError(
                        f"bases.{key}.models.{name}: also served on base {seen[name]}; names must be unique"
                    )
                seen[name] = key
        for field, name in (("compare.old", self.compare.old), ("compare.new", self.compare.new)):
            if name not in seen:
                raise ValueError(f"{field}: no model named {name!r} (served: {sorted(seen)})")
        if self.shadow.enabled:
            for a, b in self.shadow.pairs.items():
                for n in (a, b):
                    if n not in seen:
                        raise ValueError(f"shadow.pairs: no model named {n!r} (served: {sorted(seen)})")
        return self

    def base_of(self) -> dict[str, str]:
        """Model name -> the key of the base deployment that serves it."""
        return {name: key for key, b in self.bases.items() for name in b.models}

    def resolved(self, root: str | Path | None = None) -> "ServeAppConfig":
        """Paths made absolute under `root` (default: the working directory) and checked now,
        so a missing demo output fails on the driver with one line, not in a replica."""
        root = Path(root or Path.cwd())

        def at(p: str) -> str:
            return str((root / p).resolve()) if not Path(p).is_absolute() else p

        bases = {}
        for key, b in self.bases.items():
            models = {n: (at(a) if a else None) for n, a in b.models.items()}
            for n, a in models.items():
                try:
                    ModelVersion(base=at(b.path), adapter=a, name=n)
                except MuscleError as e:
                    hint = " (run `muscle demo --out runs/demo` first?)" if "runs/demo" in str(e) else ""
                    raise MuscleError(f"serve config bases.{key} model {n}: {e}{hint}") from None
            bases[key] = BaseSpec(path=at(b.path), models=models)
        shadow = self.shadow.model_copy(update={"out": at(self.shadow.out)})
        return self.model_copy(update={"bases": bases, "shadow": shadow})


def validate_app_config(raw: dict | ServeAppConfig, source: str = "serve config") -> ServeAppConfig:
    """One MuscleError line naming the field, instead of pydantic's multi-line report."""
    return raw if isinstance(raw, ServeAppConfig) else validated(ServeAppConfig, raw or {}, source)


def _serve_file_model() -> type[BaseModel]:
    """The Serve config file as far as `muscle serve` applies it: per-deployment options
    checked by Serve's own schemas, with unknown keys refused (Serve ignores them silently)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema

    class Autoscaling(AutoscalingConfig):
        model_config = ConfigDict(extra="forbid")

    class DeploymentOptions(DeploymentSchema):
        model_config = ConfigDict(extra="forbid")
        autoscaling_config: Autoscaling | None = None

    class Application(BaseModel):
        name: str = "muscle"
        route_prefix: str = "/"
        args: dict[str, Any] = {}
        deployments: list[DeploymentOptions] = []

    class ServeFile(BaseModel):
        http_options: dict[str, Any] = {}
        applications: list[Application] = Field(min_length=1)

    return ServeFile


def read_serve_file(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[ServeAppConfig, dict]:
    """(the app's validated config, Serve options) of the first application in a Serve config file.

    `overrides` ({"shadow.enabled": True}) apply to the application's `args:` block. Serve
    options: http_options, and per-deployment options by deployment name. A bad value
    anywhere is one MuscleError naming the file and the field.
    """
    p = Path(path)
    doc = read_yaml(p)
    validated(_serve_file_model(), doc, str(p))
    app = doc["applications"][0]
    source = f"{p} (applications[0].args)"
    cfg = validated(ServeAppConfig, with_overrides(app.get("args") or {}, overrides or {}, source), source)
    names = {"gateway", *(model_deployment_name(k) for k in cfg.bases)}
    deployments = {}
    for i, d in enumerate(app.get("deployments") or []):
        if d["name"] not in names:
            raise MuscleError(
                f"{p}: field 'applications[0].deployments[{i}].name': no deployment named "
                f"{d['name']!r} in this app (it has {sorted(names)})"
            )
        deployments[d["name"]] = {k: v for k, v in d.items() if k != "name"}
    options = {
        "http_options": doc.get("http_options") or {},
        "deployments": deployments,
        "name": app.get("name", "muscle"),
        "route_prefix": app.get("route_prefix", "/"),
    }
    return cfg, options
