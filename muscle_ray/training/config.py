"""Typed, validated YAML configs for the two training jobs (task adapter, compat adapter).

A job reads one YAML file into `AdapterTrainConfig` or `CompatTrainConfig` through
`muscle_ray.config.load_config`, which names a bad field.
Defaults suit tiny models on CPU; the paper used LoRA r = 128, alpha = 256, T = 2, 10 epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from muscle_ray.errors import MuscleError
from muscle_ray.model_sources import ModelName
from muscle_ray.training.losses import MASKS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Training text: a JSONL or Parquet file with `prompt` and `completion` string fields or a
    chat conversation `messages`, or a task's file (`task` + `path`) turned into pairs by
    `Task.training_pair`; without `path`, the task's training split under `data_root`."""

    path: str
    task: str | None = None
    task_options: dict[str, Any] = {}
    data_root: str | None = None  # with `task` and no `path`: data_root / the task's training_path
    val_path: str | None = None  # else the last `val_fraction` of `path` is held out
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_length: int = Field(256, gt=1)
    loss_on: Literal["all", "completion"] = "all"  # paper: all tokens, context and answer
    chat_template: bool = False  # render with the base's chat template; loss on the assistant turn only
    # Tokenize on the driver (off) or stream the file through a Ray task into tokenized chunks
    # (on); auto streams a training file over training.data.STREAM_THRESHOLD bytes.
    stream: Literal["auto", "on", "off"] = "auto"

    @field_validator("stream", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        """YAML reads a bare `on` / `off` as true / false."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="before")
    @classmethod
    def _training_split(cls, data):
        """No `path` but a task and a data root: the task's own training split there."""
        if not isinstance(data, dict) or data.get("path") is not None:
            return data
        if not (data.get("task") and data.get("data_root")):
            return data  # pydantic then says that path is required
        from muscle_ray.tasks import get_task

        split = get_task(data["task"], **(data.get("task_options") or {})).training_path
        if split is None:
            raise ValueError(f"task {data['task']} names no training split; give path")
        return {**data, "path": str(Path(data["data_root"]) / split)}


class LoraSettings(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; caps `epochs`
    max_grad_norm: float | None = 1.0


class RunSettings(_Strict):
    name: str = "muscle-train"
    storage_path: str = "runs/ray"  # Ray Train run dir; same name = resume
    num_workers: int = Field(1, gt=0)
    strategy: Literal["auto", "plain", "ddp", "fsdp"] = "auto"  # auto: plain for 1 worker, else fsdp
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    max_failures: int = Field(1, ge=-1)
    num_to_keep: int = Field(2, gt=0)
    eval_every_steps: int | None = Field(None, gt=0)  # also checkpoint mid-epoch
    log_every_steps: int = Field(1, gt=0)  # a progress line every N optimizer steps
    snapshot_every_steps: int | None = Field(None, gt=0)  # and at the last step: out/snapshots/step-N/
    seed: int = 0
    # bf16: frozen bases (student's and teachers') in bf16, forwards under bf16 autocast; LoRA
    # weights, gradients, AdamW state and the losses stay fp32. FSDP2 all-gathers bf16, reduces fp32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # Recompute each decoder block in backward; auto: on for bases over 500M parameters.
    activation_checkpointing: bool | Literal["auto"] = "auto"


class ModelRef(_Strict):
    base: ModelName
    adapter: str | None = None


class CompatSettings(_Strict):
    """What makes the compatibility job differ from a task-adapter job."""

    old: ModelRef  # base v1 + v1 task adapter
    new_adapter: str  # v2 task adapter, on the student's base
    mask: str = "muscle"  # one of MASKS, or "ce": plain CE continuation (the fair control)
    temperature: float = Field(2.0, gt=0)
    ce_weight: float = Field(0.0, ge=0.0, le=1.0)
    t2_scaling: bool = False
    init: Literal["from_new", "fresh"] = "from_new"
    teachers: Literal["inline", "colocated", "cached"] = "inline"
    topk: int | None = Field(None, gt=0)  # colocated: None = full logits; cached: required
    teacher_cpus: float = Field(0.25, gt=0)  # colocated actors / cache workers
    teacher_gpus: float = Field(0.0, ge=0)  # > 0: teachers on their own GPU share (bf16)
    cache_dir: str | None = None  # cached: where the Parquet goes (default out/teacher_cache)
    chunk_tokens: int = Field(1024, gt=0)

    @field_validator("mask")
    @classmethod
    def _known_mask(cls, mask: str) -> str:
        if mask not in MASKS + ("ce",):
            raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS + ('ce',))}")
        return mask

    @model_validator(mode="after")
    def _check(self):
        if self.teachers == "cached" and self.topk is None:
            raise ValueError("teachers: cached needs topk (the cache stores top-k log-probs + tail mass)")
        return self


class TrainConfig(_Strict):
    base: ModelName  # the student's base (v2 for compat)
    out: str  # the exported adapter directory
    data: DataConfig
    lora: LoraSettings = LoraSettings()
    optim: OptimConfig = OptimConfig()
    run: RunSettings = RunSettings()
    compat: CompatSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_from_recipe(cls, data):
        """`recipe: NAME` fills what the config leaves out from muscle_ray/recipes/NAME.yaml."""
        from muscle_ray.recipes import with_recipe

        return with_recipe(data) if isinstance(data, dict) else data

    def located(
        self, workspace: str | None = None, staging: str | Path | None = None
    ) -> tuple["TrainConfig", list[tuple[str, str]]]:
        """This config with locations the driver can open, and the copies to make on success.

        Relative paths are taken under `workspace` (MUSCLE_WORKSPACE: a cluster job runs in
        Ray's unpacked copy of the code, not in your checkout). Training data URIs are fetched
        into `staging` (the driver reads and tokenizes them); an `out` URI becomes a local
        directory returned as a (local_dir, uri) copy to make after the run. Model directories
        are read by every train worker, so they must be a path all nodes see (local or NFS).
        """
        import shutil

        from muscle_ray.locations import copy_location, in_workspace, is_uri, staging_dir

        def local(field: str, p: str | None) -> str | None:
            if p is None:
                return None
            if is_uri(p):
                if field == "run.storage_path":
                    return p  # Ray Train writes its run directory to a URI itself
                raise MuscleError(
                    f"{field}: {p}: not a URI here; model directories must be a path every node can read (local or NFS)"
                )
            return in_workspace(p, workspace)

        def staged(uri: str) -> Path:
            return staging_dir(uri, staging, "muscle train-*")

        def data_file(field: str, p: str | None) -> str | None:
            if p is None or not is_uri(p):
                return local(field, p)
            dest = staged(p) / p.rstrip("/").rsplit("/", 1)[-1]
            copy_location(p, dest)
            return str(dest)

        raw, copies = self.model_dump(), []
        raw["base"] = local("base", self.base)
        raw["data"]["path"] = data_file("data.path", self.data.path)
        raw["data"]["val_path"] = data_file("data.val_path", self.data.val_path)
        raw["run"]["storage_path"] = local("run.storage_path", self.run.storage_path)
        if is_uri(self.out):
            raw["out"] = str(staged(self.out) / "out")
            shutil.rmtree(raw["out"], ignore_errors=True)  # the export must hold this run's files only
            copies.append((raw["out"], self.out))
        else:
            raw["out"] = local("out", self.out)
        if self.compat is not None:
            c = raw["compat"]
            c["old"]["base"] = local("compat.old.base", c["old"]["base"])
            c["old"]["adapter"] = local("compat.old.adapter", c["old"]["adapter"])
            c["new_adapter"] = local("compat.new_adapter", c["new_adapter"])
            c["cache_dir"] = local("compat.cache_dir", c["cache_dir"])
        return type(self).model_validate(raw), copies


class AdapterTrainConfig(TrainConfig):
    """`muscle train-adapter`: a task adapter, trained with cross-entropy on its data alone."""

    @field_validator("compat")
    @classmethod
    def _no_compat(cls, v):
        if v is not None:
            raise ValueError("not allowed for train-adapter (use train-compat)")
        return v


class CompatTrainConfig(TrainConfig):
    """`muscle train-compat`: the compatibility adapter, which needs the old model and the new adapter."""

    compat: CompatSettings
