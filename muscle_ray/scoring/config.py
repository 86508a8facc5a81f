"""What one `muscle score` run does, typed and validated (pydantic); `muscle_ray.config.load_config`
reads it from a YAML file and flags.

A YAML config scores several model versions in one invocation::

    task: hellaswag
    data: ../shared/data/hellaswag/val_sample1000.jsonl
    out: runs/hellaswag
    workers: [1, 4]            # min, max actors: the pool autoscales (unset: sized to the machine)
    backend_options: {dtype: bfloat16}
    versions:
      - {name: old, base: models/v1}
      - {name: new, base: models/v2}
      - {name: compat, base: models/v2, adapter: adapters/compat}
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from muscle_ray.config import validated
from muscle_ray.errors import MuscleError
from muscle_ray.model_sources import ModelName
from muscle_ray.models import ModelVersion


class VersionSpec(BaseModel):
    """One model version: a base model directory plus an optional PEFT adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: ModelName
    adapter: str | None = None

    @classmethod
    def parse(cls, text: str) -> "VersionSpec":
        """`name=BASE[:ADAPTER]`, as given to --version."""
        name, sep, rest = text.partition("=")
        if not sep or not rest:
            raise MuscleError(f"--version {text!r}: expected NAME=BASE_DIR[:ADAPTER_DIR]")
        base, _, adapter = rest.partition(":")
        return cls(name=name, base=base, adapter=adapter or None)

    def model_version(self) -> ModelVersion:
        return ModelVersion(base=self.base, adapter=self.adapter, name=self.name)


class HFOptions(BaseModel):
    """`backend_options` of the hf backend: how `HFScorer` loads each model."""

    model_config = ConfigDict(extra="forbid")
    device_map: str | dict[str, Any] | None = Field(None, description='"cpu", "cuda:0", "auto" or a module map')
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None, description="default: float32 on CPU, bfloat16 on GPU; auto: the checkpoint's"
    )
    attn_implementation: Literal["sdpa", "eager"] | None = Field(
        None, description="a question's options are packed with a custom attention mask, which flash attention ignores"
    )


class VLLMOptions(BaseModel):
    """`backend_options` of the vllm backend: arguments of `vllm.LLM`."""

    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int | None = Field(None, ge=1, description="GPUs per actor (the pool asks Ray for them)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="a fraction of each GPU's memory")
    max_model_len: int | None = Field(None, gt=0, description="tokens; default: the model's context length")
    enforce_eager: bool | None = Field(None, description="no CUDA graphs")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None, description="default: bfloat16 on GPU, float32 on CPU"
    )


BACKEND_OPTIONS: dict[str, type[BaseModel]] = {"hf": HFOptions, "vllm": VLLMOptions}


def check_backend_options(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options the backend accepts, typed; an unknown key or a bad value names it."""
    model = BACKEND_OPTIONS[backend]
    for key in options:
        if key not in model.model_fields:
            known = ", ".join(model.model_fields)
            raise ValueError(f"backend_options: {key!r} is not an option of the {backend} backend (known: {known})")
    try:
        return model.model_validate(options).model_dump(exclude_none=True)
    except ValidationError as e:
        first = e.errors()[0]
        key = str(first["loc"][0])
        hint = model.model_fields[key].description
        raise ValueError(
            f"backend_options.{key} ({backend} backend): {first['msg']}" + (f" ({hint})" if hint else "")
        ) from None


def _unless_auto(v: Any) -> Any:
    return None if isinstance(v, str) and v.strip().lower() == "auto" else v


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    versions: list[VersionSpec] = Field(min_length=1)
    task: str
    task_options: dict[str, Any] = {}
    data: str | None = None  # the task's file; default: task.default_path under data_root
    data_root: str | None = None
    limit: int | None = Field(None, gt=0)
    out: str
    backend: Literal["hf", "vllm"] = "hf"
    backend_options: dict[str, Any] = {}  # engine settings, checked per backend (BACKEND_OPTIONS)
    batch_size: int = Field(8, gt=0)  # questions (MC) or prompts (generation) per forward pass
    # The pool: None ("auto") is sized to what Ray has by `placement.resolve_placement` when the
    # run starts (a local Ray: one actor per CPU or GPU; a cluster: 1..N actors, autoscaling).
    workers: tuple[int, int] | None = None  # (min, max) actors; equal for a fixed pool
    shard_size: int = Field(256, gt=0)  # input rows per output shard (the unit of resume)
    max_errors: int | None = Field(None, ge=0)
    cpus_per_worker: float | None = Field(None, gt=0)  # torch threads: this, rounded (at least 1)
    gpus_per_worker: float | None = Field(None, ge=0)
    chat_template: bool = False  # read prompts through each model's chat template (muscle_ray.chat)

    @field_validator("cpus_per_worker", "gpus_per_worker", mode="before")
    @classmethod
    def _auto(cls, v):
        """`auto` is None: sized when the run starts."""
        return _unless_auto(v)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v):
        """`N`, `MIN,MAX`, an int, or a pair; None or `auto`: sized when the run starts."""
        v = _unless_auto(v)
        if v is None:
            return v
        if isinstance(v, str):
            parts = [p.strip() for p in v.split(",")]
            if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
                raise ValueError(f"expected N or MIN,MAX, got {v!r}")
            v = [int(p) for p in parts]
        if isinstance(v, int):
            v = (v, v)
        if isinstance(v, (list, tuple)) and len(v) == 1:
            v = (v[0], v[0])
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.workers is not None:
            lo, hi = self.workers
            if lo < 1 or hi < lo:
                raise ValueError(f"workers: need 1 <= MIN <= MAX, got {lo},{hi}")
        self.backend_options = check_backend_options(self.backend, self.backend_options)
        tp = self.backend_options.get("tensor_parallel_size", 1)
        if self.gpus_per_worker is not None and 0 < self.gpus_per_worker < tp:
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker:g}: tensor_parallel_size {tp} needs {tp} GPUs per actor"
            )
        names = [v.name for v in self.versions]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"versions: duplicate name(s) {sorted(dup)}; give each --version its own NAME")
        return self

    def data_path(self, default_path: str | None) -> str:
        if self.data:
            return self.data
        if default_path and self.data_root:
            return str(Path(self.data_root) / default_path)
        hint = f" or --data-root (the task's file is {default_path})" if default_path else ""
        raise MuscleError(f"task {self.task}: no input file; give --data PATH{hint}")

    def located(
        self, workspace: str | None = None, staging: str | Path | None = None
    ) -> tuple["ScoreConfig", list[tuple[str, str]]]:
        """This config with locations the driver can open, and the copies to make on success.

        A cluster job's working directory is Ray's unpacked copy of the code, so relative paths
        are taken under `workspace` (MUSCLE_WORKSPACE) when given. A `data` URI is fetched into
        `staging`; an `out` URI becomes a local directory, seeded with the shards already there
        (so a rerun resumes), and is returned as a (local_dir, uri) copy to make after the run.
        The driver reads the data and writes every shard, so this holds on any number of nodes.
        Model directories are read by actors on every node: they must be a path all nodes see.
        """
        from muscle_ray.locations import copy_location, in_workspace, is_uri, staging_dir, uri_exists

        def local(field: str, p: str | None) -> str | None:
            if p is None:
                return None
            if is_uri(p):
                raise MuscleError(
                    f"{field}: {p}: model directories and data_root must be a path every "
                    "node can read (local or NFS), not a URI; copy them there first"
                )
            return in_workspace(p, workspace)

        def staged(uri: str) -> Path:
            return staging_dir(uri, staging, "muscle score")

        copies: list[tuple[str, str]] = []
        fields = self.model_dump()
        fields["versions"] = [
            {
                **v,
                "base": local(f"versions[{i}].base", v["base"]),
                "adapter": local(f"versions[{i}].adapter", v["adapter"]),
            }
            for i, v in enumerate(fields["versions"])
        ]
        fields["data_root"] = local("data_root", self.data_root)
        if self.data and is_uri(self.data):
            dest = staged(self.data) / self.data.rstrip("/").rsplit("/", 1)[-1]
            copy_location(self.data, dest)
            fields["data"] = str(dest)
        else:
            fields["data"] = local("data", self.data)
        if is_uri(self.out):
            dest = staged(self.out) / "out"
            shutil.rmtree(dest, ignore_errors=True)
            if uri_exists(self.out):
                copy_location(self.out, dest)
            fields["out"] = str(dest)
            copies.append((str(dest), self.out))
        else:
            fields["out"] = local("out", self.out)
        return validated(type(self), fields, "located config"), copies
