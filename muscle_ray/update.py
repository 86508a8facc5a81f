"""`muscle update`: the whole MUSCLE update for two base versions of any model.

    task adapters on v1 and v2 -> flip scoring of v1/v2 -> compat adapter (and the CE control,
    and named variants) -> scoring of compat, control, their snapshots, the variants
    -> (select: compat) scoring on validation data, the selected snapshot on test
    -> (adapter_seeds) more task adapters on v1 and v2, scored -> report.json/md/html -> serve.yaml

The fair fight: compat and the control are exported every `snapshot_every` steps, and every
snapshot is scored as its own version, so the report compares their NFR-accuracy curves (both
start at the v2 task adapter) and not one point each. Adapters train with Ray Train, results
are scored by the Ray Data scoring job, each stage is one console line. Every product stays in
the run folder::

    adapters/<task>/{v1,v2,compat,control}/   PEFT adapters, each with muscle_manifest.json
    adapters/<task>/compat/snapshots/step-N/  compat's (and control's) snapshots: the curves
    adapters/<task>/{v1,v2}-seed<K>/          task adapters of the extra adapter seeds
    adapters/<task>/variant-<name>/           compat variants (VARIANTS)
    adapters/<task>/compat-selected/          the snapshot chosen on validation data (select: compat)
    results/<task>/<version>/                 results-format Parquet shards; snapshots are
                                              versions `compat-s000060`, `control-s000060`
    results/<task>/val/<version>/             the same on the validation split (select: compat)
    report.json, report.md, report.html       the paper's Tables 4-6 and the fight, one row per task
    serve.yaml                                old/new/compat/control of every task: `muscle serve --config`
    ray/, logs/                               the Ray Train runs; Ray's output

A rerun skips what is finished and redoes what changed. An adapter is a function of its inputs
key (its training config and the content of its base, data and teacher adapters): one whose
manifest records the same key is reused, any other is retrained. Results record the key of
what they scored, so a retrained adapter is rescored while an unchanged one keeps its shards
(the scoring job resumes shard by shard). `muscle demo` is this pipeline over the synthetic zoo.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from muscle_ray.console import Console
from muscle_ray.errors import MuscleError
from muscle_ray.metrics.format import pct
from muscle_ray.model_sources import ModelName
from muscle_ray.recipes import merge

RECIPES = {"adapter": "task_adapter", "compat": "compat"}
VERSIONS = {"v1": "old", "v2": "new", "compat": "compat", "control": "control"}  # folder -> served name
INPUTS = "_inputs.json"  # beside a version's results: what they scored
SELECTED = "compat-selected"  # the compat snapshot chosen on validation data (select: compat)

# Named departures from the paper's compat recipe (recipes/compat.yaml): each is a compat adapter
# from the v2 task adapter with these fields over the recipe and the config's `compat`.
VARIANTS: dict[str, dict[str, Any]] = {
    "muscle+ce": {"compat": {"ce_weight": 0.5}},  # Eq. 5, L = (1-λ)·L_mcomp + λ·CE: the paper leaves λ unstated
    "answer_only": {"data": {"loss_on": "completion"}},  # L_mcomp on the answer tokens only, not the context
}
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(_Strict):
    """One task of the update: the data it is scored on, the data its adapters learn from."""

    task: str  # a registered task: arc_easy, mc_jsonl, gen_jsonl, lmeval:<task>, ...
    name: str = ""  # its folder and report label (default: the task, ':' -> '_')
    data: str | None = None  # the eval split (default: the task's file under data_root)
    data_root: str | None = None
    task_options: dict[str, Any] = {}
    val_data: str | None = None  # a validation split in the eval file's format (select: compat reads it)
    chat_template: bool = False  # scoring and training read prompts through each model's template
    # FILE: rows in the task's own format (their gold answers are the targets); or training-data
    # fields: {path, val_path} of prompt/completion or chat-messages rows, or {data_root: ROOT}
    # for the task's own training split there.
    train: str | dict[str, Any]
    old_adapter: str | None = None  # an existing v1 task adapter, used instead of training one
    new_adapter: str | None = None  # likewise on v2 (compat starts as a copy of it)

    @model_validator(mode="after")
    def _check(self):
        from muscle_ray.tasks import get_task

        try:
            task = get_task(self.task, **self.task_options)
        except (MuscleError, TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
        if not self.data and not (self.data_root and task.default_path):
            raise ValueError(
                f"task {self.task}: give data (its eval file)"
                + (f" or data_root (holding {task.default_path})" if task.default_path else "")
            )
        self.name = self.name or re.sub(r"[^A-Za-z0-9_.-]", "_", self.task)
        if not _LABEL.match(self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, '_', '.', '-' (it names folders and models)")
        return self

    def training_data(self) -> dict[str, Any]:
        """The `data:` fields of this task's training configs (over the recipe's)."""
        own = {"task": self.task, "task_options": self.task_options}
        if isinstance(self.train, str):
            return {**own, "path": self.train, "chat_template": self.chat_template}
        if "path" not in self.train and "task" not in self.train:
            return {**own, "chat_template": self.chat_template, **self.train}
        return {"chat_template": self.chat_template, **self.train}


class ScoringSettings(_Strict):
    batch_size: int = Field(16, gt=0)
    # None ("auto"): `scoring.placement` sizes the pool from what Ray has when the job starts
    workers: tuple[int, int] | None = None  # N, or MIN,MAX: the actor pool autoscales
    limit: int | None = Field(None, gt=0)  # the first N eval rows of each task
    backend: Literal["hf", "vllm"] = "hf"
    backend_options: dict[str, Any] = {}  # reach the engines (`muscle score --backend-option`)
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v):
        """N, MIN,MAX, a pair or "auto", as `muscle score --workers` reads them."""
        from muscle_ray.scoring.config import ScoreConfig

        return ScoreConfig._workers(v)

    @field_validator("workers")
    @classmethod
    def _pool(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 1 <= v[0] <= v[1]:
            raise ValueError(f"need 1 <= MIN <= MAX, got {v[0]},{v[1]}")
        return v


class UpdateConfig(_Strict):
    """A whole MUSCLE update: two bases, the tasks, one adapter recipe, compat, scoring."""

    out: str = "runs/update"
    old: ModelName  # v1 base: a local HF directory, hub id (org/name[@rev]) or .gguf
    new: ModelName  # v2 base; must share v1's tokenizer (token-level distillation)
    tasks: list[TaskSpec] = Field(min_length=1)
    # Fields over the recipes, in TrainConfig's shape: `adapter` over muscle_ray/recipes/task_adapter.yaml
    # (v1 and v2 task adapters), `compat` over recipes/compat.yaml (compat; with mask ce, the control).
    adapter: dict[str, Any] = {}
    compat: dict[str, Any] = {}
    control: bool = True  # also the fair control: the v2 adapter trained on with plain CE
    seed: int = 0  # every adapter's seed ...
    new_seed: int | None = None  # ... but v2's task adapter's, when given
    # Compat and control are exported every K steps and each snapshot scored (their curves).
    # Default: a fifth of compat's steps; 0: no snapshots (no curves, no fight).
    snapshot_every: int | None = Field(None, ge=0)
    # Which compat the report sets against loss-based compat: "loss" (the export with the best
    # validation loss, the paper's) only; "compat": also the snapshot with the fewest negative flips
    # on each task's val_data among those within `select_floor` of v2's validation accuracy.
    select: Literal["loss", "compat"] = "loss"
    select_floor: float = Field(0.0, ge=0)
    adapter_seeds: list[int] = []  # more v1/v2 task adapters (versions v1-seed7, v2-seed7): flip overlap
    variants: list[str] = []  # departures from the paper's compat recipe, by name (VARIANTS)
    scoring: ScoringSettings = ScoringSettings()
    threads: int = Field(1, gt=0)  # torch threads per train worker
    concurrent_fits: int = Field(3, gt=0)  # Ray Train runs at once
    _snapshot_steps: int | None = PrivateAttr(None)

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two tasks named {', '.join(dup)}; give each its own name")
        return tasks

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        for v in variants:
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        if len(set(variants)) < len(variants):
            raise ValueError(f"a variant named twice in {variants}")
        return variants

    @model_validator(mode="after")
    def _recipes(self):
        """A bad recipe override or option fails here, when the config is read, not after hours of work."""
        try:
            compat = check_overrides(self.adapter, self.compat)
        except MuscleError as e:
            raise ValueError(str(e)) from None
        if self.snapshot_every is None:
            if compat.optim.max_steps is None:
                raise ValueError("snapshot_every: compat.optim.max_steps is not set, so give it (0: no snapshots)")
            self._snapshot_steps = max(1, compat.optim.max_steps // 5)
        else:
            self._snapshot_steps = self.snapshot_every or None
        if self.select == "compat":
            if not self._snapshot_steps:
                raise ValueError("select: compat picks one of compat's snapshots, but snapshot_every is 0")
            missing = [t.name for t in self.tasks if not t.val_data]
            if missing:
                raise ValueError(
                    f"select: compat scores compat's snapshots on validation data (never on the test set): "
                    f"give val_data for task {', '.join(missing)}"
                )
        seeds = [self.seed, *self.adapter_seeds]
        if len(set(seeds)) < len(seeds):
            raise ValueError(
                f"adapter_seeds {self.adapter_seeds}: each must differ from the others and from seed {self.seed}"
            )
        given = [t.name for t in self.tasks if t.old_adapter or t.new_adapter]
        if self.adapter_seeds and given:
            raise ValueError(
                f"adapter_seeds train task adapters on both bases, but task {', '.join(given)} "
                "gives its own (old_adapter/new_adapter): their flips would not be alike"
            )
        return self

    def snapshot_steps(self) -> int | None:
        """The steps between compat's (and control's) snapshots; None: no snapshots."""
        return self._snapshot_steps

    def versions(self) -> list[str]:
        return ["v1", "v2", "compat"] + (["control"] if self.control else [])

    def located(self) -> "UpdateConfig":
        """This config with the run folder and local model directories absolute (under
        MUSCLE_WORKSPACE when relative): Ray workers and submitted jobs run elsewhere."""
        return self.model_copy(update={"out": _local(self.out), "old": _model(self.old), "new": _model(self.new)})


def check_overrides(adapter: dict, compat: dict, source: str | None = None):
    """Fail on a bad recipe override before any work starts (paths are placeholders here);
    returns the compat config so checked."""
    paths = {"base": "-", "out": "-", "data": {"path": "-"}}
    train_config("adapter", adapter, compat, paths, source)
    return train_config(
        "compat", adapter, compat, merge(paths, {"compat": {"old": {"base": "-"}, "new_adapter": "-"}}), source
    )


def train_config(kind: Literal["adapter", "compat"], adapter: dict, compat: dict, run: dict, source: str | None = None):
    """The recipe, the config's overrides of it, then one run's paths, data, seed and name;
    a bad field is named under `kind` (and `source`, when given).

    The compat adapter continues the v2 task adapter, so it keeps the task adapters' data and
    LoRA fields (`adapter.data`, `adapter.lora`) under its own overrides; their schedule is theirs.
    """
    from muscle_ray.config import validated
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

    model = AdapterTrainConfig if kind == "adapter" else CompatTrainConfig
    shape = {k: v for k, v in adapter.items() if k in ("data", "lora")}
    overrides = adapter if kind == "adapter" else merge(shape, compat)
    raw = merge({"recipe": RECIPES[kind]}, overrides, run)
    where = f"{kind} (over muscle_ray/recipes/{RECIPES[kind]}.yaml)"
    return validated(model, raw, f"{source}: {where}" if source else where)


# --- what each task needs: its adapters, where its results go ---------------------------------


@dataclass
class Adapter:
    """One adapter of the update, on `base`: trained here from `train`, or given (train None)."""

    base: str
    path: Path
    train: Any = None  # a TrainConfig


@dataclass
class TaskPlan:
    """One task of one update: its spec, adapters, eval file and result folder."""

    cfg: UpdateConfig
    spec: TaskSpec
    tag: str  # how the console names it
    adapters: dict[str, Adapter]
    data: str  # the eval file
    rows: int  # eval rows scored per version
    results: Path
    val: str | None = None  # the validation file (select: compat), scored into results/val
    val_rows: int = 0
    curves: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # compat/control: (step, version)
    products: dict[str, str] = field(default_factory=dict)  # what this run did to each product

    @property
    def name(self) -> str:
        return self.spec.name

    def split_file(self, split: Literal["test", "val"]) -> str:
        if split == "val":
            assert self.val, f"task {self.name}: no val_data"
            return self.val
        return self.data

    def split_results(self, split: Literal["test", "val"]) -> Path:
        return self.results / "val" if split == "val" else self.results

    def done(self, path: Path, what: str) -> None:
        """Record what happened to a product (trained, reused, given, scored N), by its path in the run."""
        root = Path(self.cfg.out)
        self.products[str(path.relative_to(root)) if path.is_relative_to(root) else str(path)] = what

    def compat_adapter(self, version: str, over: dict | None = None, snapshots: bool = False) -> Adapter:
        """A compat-recipe adapter on v2 from the v2 task adapter, `over` on top of the recipe
        and the config's `compat` (`{"compat": {"mask": "ce"}}`: the control); with `snapshots`,
        also exported every `snapshot_every` steps."""
        cfg, root = self.cfg, Path(self.cfg.out)
        start = {
            "old": {"base": cfg.old, "adapter": str(self.adapters["v1"].path)},
            "new_adapter": str(self.adapters["v2"].path),
        }
        path = root / "adapters" / self.name / version
        run = merge(_run_fields(cfg, self.spec, path, version, cfg.new, cfg.seed), {"compat": start}, over or {})
        if snapshots and cfg.snapshot_steps():
            run = merge(run, {"run": {"snapshot_every_steps": cfg.snapshot_steps()}})
        return Adapter(cfg.new, path, train_config("compat", cfg.adapter, cfg.compat, run))

    def snapshot_versions(self, curve: str) -> list[str]:
        """The snapshots of a trained compat or control adapter as versions of their own
        (`compat-s000060`), recorded in `curves`; results of snapshots no longer there are removed."""
        from muscle_ray.training.snapshots import list_snapshots

        a, points = self.adapters[curve], []
        for step, path in list_snapshots(a.path):
            points.append((step, f"{curve}-s{step:06d}"))
            self.adapters[points[-1][1]] = Adapter(a.base, path)
        self.curves[curve] = points
        keep = {v for _, v in points}
        for root in (self.results, self.results / "val"):
            for d in root.glob(f"{curve}-s[0-9][0-9][0-9][0-9][0-9][0-9]"):
                if d.name not in keep:
                    shutil.rmtree(d)
        return [v for _, v in points]


def _local(path: str) -> str:
    """A path every Ray worker opens the same way: absolute, under MUSCLE_WORKSPACE when relative."""
    from muscle_ray.locations import in_workspace, is_uri

    if is_uri(path):
        raise MuscleError(f"{path}: muscle update reads and writes local paths (or NFS), not URIs")
    return str(Path(in_workspace(os.path.expanduser(path), os.environ.get("MUSCLE_WORKSPACE"))).resolve())


def _model(ref: str) -> str:
    """A model directory made absolute; a hub id that is not on disk stays as it is."""
    from muscle_ray.locations import in_workspace

    path = Path(in_workspace(os.path.expanduser(ref), os.environ.get("MUSCLE_WORKSPACE")))
    return str(path.resolve()) if path.exists() else ref


def _run_fields(cfg: UpdateConfig, spec: TaskSpec, out: Path, version: str, base: str, seed: int) -> dict:
    data = spec.training_data()
    for k in ("path", "val_path", "data_root"):
        if data.get(k) is not None:
            data[k] = _local(data[k])
    return {
        "base": base,
        "out": str(out),
        "data": data,
        "run": {"name": f"{spec.name}-s{cfg.seed}-{version}", "storage_path": str(Path(cfg.out) / "ray"), "seed": seed},
    }


def control_overrides(cfg: UpdateConfig) -> dict:
    """The fair control: plain cross-entropy from the v2 adapter for compat's steps, on the tokens
    the task adapters learnt from (their recipe's `data.loss_on`), so that its curve is also "N
    more steps of the task adapters' own training": the plateau check. (CE on every token, the
    prompts' random names included, only drags it down: a weaker control, not a fairer one.)"""
    task = train_config("adapter", cfg.adapter, cfg.compat, {"base": "-", "out": "-", "data": {"path": "-"}})
    return {"compat": {"mask": "ce"}, "data": {"loss_on": task.data.loss_on}}


def plan(cfg: UpdateConfig, suffix: str = "") -> list[TaskPlan]:
    """Every task's adapters and files, checked before any work starts: the recipe overrides,
    the training data, the eval file (its rows counted), given adapters, the shared tokenizer.
    The console names each task by its name and `suffix`."""
    from muscle_ray.models import ModelVersion, check_same_tokenizer
    from muscle_ray.tasks import get_task

    root = Path(cfg.out)
    check_same_tokenizer([ModelVersion(cfg.old, name="v1 (old)"), ModelVersion(cfg.new, name="v2 (new)")])
    plans = []
    for spec in cfg.tasks:
        adapters = {}
        new_seed = cfg.seed if cfg.new_seed is None else cfg.new_seed
        task_adapters = [("v1", spec.old_adapter, cfg.seed), ("v2", spec.new_adapter, new_seed)]
        for k in cfg.adapter_seeds:  # both task adapters of seed k take seed k
            task_adapters += [(f"v1-seed{k}", None, k), (f"v2-seed{k}", None, k)]
        for version, given, seed in task_adapters:
            base = cfg.old if version.startswith("v1") else cfg.new
            if given is not None:
                ModelVersion(base, _local(given), name=version)  # a PEFT directory
                adapters[version] = Adapter(base, Path(_local(given)))
            else:
                path = root / "adapters" / spec.name / version
                run = _run_fields(cfg, spec, path, version, base, seed)
                adapters[version] = Adapter(
                    base, path, train_config("adapter", cfg.adapter, cfg.compat, run, f"task {spec.name}")
                )
        task = get_task(spec.task, **spec.task_options)
        if spec.data:
            data = _local(spec.data)
        else:  # TaskSpec checked there are both
            assert spec.data_root and task.default_path
            data = str(Path(_local(spec.data_root)) / task.default_path)
        rows = _rows(spec, data, "eval", cfg.scoring.limit)
        p = TaskPlan(cfg, spec, spec.name + suffix, adapters, data, rows, root / "results" / spec.name)
        if cfg.select == "compat":
            assert spec.val_data  # UpdateConfig checked
            p.val = _local(spec.val_data)
            p.val_rows = _rows(spec, p.val, "validation", cfg.scoring.limit)
        p.adapters["compat"] = p.compat_adapter("compat", snapshots=True)
        if cfg.control:
            p.adapters["control"] = p.compat_adapter("control", control_overrides(cfg), snapshots=True)
        for name in cfg.variants:
            p.adapters[variant_version(name)] = p.compat_adapter(variant_version(name), VARIANTS[name])
        plans.append(p)
    return plans


def _rows(spec: TaskSpec, path: str, what: str, limit: int | None) -> int:
    """The rows of an eval-format file that are scored (the first `limit`); fails on a missing file."""
    from muscle_ray.tasks import get_task

    if not Path(path).exists():
        raise MuscleError(f"task {spec.name}: {path}: no such {what} file")
    task = get_task(spec.task, **spec.task_options)
    return sum(1 for _ in islice(task.records(path), limit))


def variant_version(name: str) -> str:
    """A variant's version and folder name: `muscle+ce` -> `variant-muscle-ce`."""
    return "variant-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)


# --- inputs keys: what an adapter or a result set is a function of --------------------------


def content_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (their names in it, and bytes)."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    if not files:
        raise MuscleError(f"{path}: no such file or directory")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p)}:{content_digest(f)}".encode())
    return h.hexdigest()


def adapter_digest(path: str | Path) -> str:
    """The adapter's own files (config and weights), not the manifest beside them."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted([p / "adapter_config.json", *p.glob("*.safetensors")]):
        h.update(f.name.encode() + content_digest(f).encode())
    return h.hexdigest()


def _base(path: str) -> dict:
    from muscle_ray.training.lora import base_fingerprint

    return {k: v for k, v in base_fingerprint(path).items() if k != "path"}  # what it is, not where


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def training_key(train) -> str:
    """An adapter's inputs key: its config without the paths it is read from and written to,
    and the content of its base, data files and teachers."""
    config = train.model_dump(exclude={"base": True, "out": True, "run": {"name", "storage_path"}})
    for k in ("path", "val_path", "data_root", "stream"):  # stream: how it is read, not what
        config["data"].pop(k)
    parts: dict[str, Any] = {
        "config": config,
        "base": _base(train.base),
        "data": [content_digest(p) for p in (train.data.path, train.data.val_path) if p],
    }
    c = train.compat
    if c is not None:
        for k in ("old", "new_adapter", "cache_dir"):
            config["compat"].pop(k)
        parts["old"] = {"base": _base(c.old.base), "adapter": c.old.adapter and adapter_digest(c.old.adapter)}
        parts["new_adapter"] = adapter_digest(c.new_adapter)
    return _key(parts)


def same_training(a, b) -> bool:
    """Whether two training configs train the same adapter (where it goes, its run's name and
    its snapshots aside): a second adapter of the same config need not be trained."""
    where = {"out": True, "run": {"name", "storage_path", "snapshot_every_steps"}}
    return type(a) is type(b) and a.model_dump(exclude=where) == b.model_dump(exclude=where)


def results_key(plan: TaskPlan, version: str, split: Literal["test", "val"] = "test") -> str:
    """A result set's inputs key: the model version (its content, and where it is, as the scoring
    job's own check of a resumed run has it) and how it was scored, on which split."""
    a, s = plan.adapters[version], plan.cfg.scoring
    return _key(
        {
            "base": _base(a.base),
            "adapter": adapter_digest(a.path),
            "where": [a.base, str(a.path)],
            "task": plan.spec.task,
            "task_options": plan.spec.task_options,
            "data": content_digest(plan.split_file(split)),
            "limit": s.limit,
            "chat_template": plan.spec.chat_template,
            "backend": s.backend,
        }
    )


def _manifest(path: Path) -> dict | None:
    f = path / "muscle_manifest.json"
    return json.loads(f.read_text()) if f.is_file() else None


# --- one run's shared state and its stages ---------------------------------------------------


@dataclass
class TaskOutcome:
    """What one task's pipeline produced: its table row, comparisons and where things came from."""

    row: dict
    comparisons: dict
    ray_stages: dict


class UpdateRun:
    """One run's shared state: the console, Ray Train slots and stage timings.

    Task pipelines run concurrently, so a stage's time is the span from its first start to its
    last end across pipelines (summing would count overlapped time twice).
    """

    def __init__(self, console: Console, threads: int = 1, concurrent_fits: int = 3):
        self.console, self.threads = console, threads
        self.fit_slots = threading.BoundedSemaphore(concurrent_fits)
        self.spans: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    @contextmanager
    def span(self, name: str):
        t = time.perf_counter()
        yield
        end = time.perf_counter()
        with self._lock:
            start0, end0 = self.spans.get(name, (t, end))
            self.spans[name] = [min(start0, t), max(end0, end)]

    @contextmanager
    def stage(self, name: str, who: str = "", total: int | None = None, unit: str = "steps"):
        """A console line (`who: name`, with a live bar) and a timed span under `name`."""
        with self.span(name), self.console.stage(f"{who}: {name}" if who else name, total, unit) as stage:
            yield stage

    @property
    def timings(self) -> dict[str, float]:
        spans = {k: round(end - start, 1) for k, (start, end) in self.spans.items()}
        return {**spans, "total": round(time.perf_counter() - self.t0, 1)}

    def parallel(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """Run task pipelines in threads (their stages wait on Ray, not on this process)."""
        _import_before_threads()
        with ThreadPoolExecutor(len(calls)) as pool:
            return [f.result() for f in [pool.submit(c) for c in calls]]

    def train(self, p: TaskPlan, name: str, versions: list[str], who: str | None = None) -> list[dict]:
        """Fit the task's adapters whose inputs changed (several at once, at most
        `concurrent_fits` across the run), reuse the others; returns the manifests of all but
        given adapters."""
        todo, manifests = {}, []
        for version in versions:
            a = p.adapters[version]
            if a.train is None:
                p.done(a.path, "given")
                continue
            key = training_key(a.train)
            manifest = _manifest(a.path)
            if manifest is not None and manifest.get("inputs_key") == key:
                p.done(a.path, "reused")
                manifests.append(manifest)
            else:
                run = a.train.run.model_copy(update={"name": f"{a.train.run.name}-{key[:8]}"})
                todo[version] = (a, a.train.model_copy(update={"run": run}), key)
        steps = [t.optim.max_steps for _, t, _ in todo.values()]
        with self.stage(name, who or p.tag, None if None in steps or not todo else sum(steps)) as stage:
            if not todo:
                stage.note = "reused: same config and inputs"
            with ThreadPoolExecutor(max(1, len(todo))) as pool:
                futures = {v: pool.submit(self._fit, a, t, key, stage.reporter(v)) for v, (a, t, key) in todo.items()}
                for v, f in futures.items():
                    manifests.append(f.result())
                    p.done(todo[v][0].path, "trained")
        return manifests

    def _fit(self, adapter: Adapter, train, key: str, progress) -> dict:
        from muscle_ray.training.job import run_training

        (adapter.path / "muscle_manifest.json").unlink(missing_ok=True)  # not this adapter until it is done
        with self.fit_slots:
            self.console.log(f"training {adapter.path} (inputs key {key[:12]}, Ray Train run {train.run.name})")
            manifest = run_training(train, threads_per_worker=self.threads, progress=progress)
        manifest["inputs_key"] = key
        (adapter.path / "muscle_manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        return manifest

    def score(
        self,
        plan: TaskPlan,
        name: str,
        versions: list[str],
        who: str | None = None,
        split: Literal["test", "val"] = "test",
    ):
        """Score model versions of one task on its eval (or validation) split, in one scoring
        run: results of other inputs are removed first, finished shards of the same inputs are
        kept (the scoring job resumes)."""
        from muscle_ray.config import validated
        from muscle_ray.scoring.config import ScoreConfig
        from muscle_ray.scoring.job import run_score

        out = plan.split_results(split)
        for v in versions:
            key, d = results_key(plan, v, split), out / v
            stamp = d / INPUTS
            if d.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
                self.console.log(f"{d}: scored other inputs; scoring again")
                shutil.rmtree(d)
            d.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps({"key": key, "adapter": str(plan.adapters[v].path)}))
        s, spec = plan.cfg.scoring, plan.spec
        sc = validated(
            ScoreConfig,
            dict(
                task=spec.task,
                task_options=spec.task_options,
                data=plan.split_file(split),
                out=str(out),
                limit=s.limit,
                batch_size=s.batch_size,
                workers=s.workers,
                backend=s.backend,
                backend_options=s.backend_options,
                cpus_per_worker=s.cpus_per_worker,
                gpus_per_worker=s.gpus_per_worker,
                chat_template=spec.chat_template,
                versions=[
                    {"name": v, "base": plan.adapters[v].base, "adapter": str(plan.adapters[v].path)} for v in versions
                ],
            ),
            f"task {plan.name}",
        )
        rows = plan.val_rows if split == "val" else plan.rows
        with self.stage(name, who or plan.tag, len(versions) * rows, "rows") as stage:
            summaries = run_score(sc, log=self.console.log, progress=stage.advance)
            if not any(x.scored for x in summaries):
                stage.note = "reused: every shard on disk"
        for x in summaries:
            plan.done(out / x.version, f"scored {x.scored}" if x.scored else "reused")
        return summaries


def task_pipeline(run: UpdateRun, p: TaskPlan) -> TaskOutcome:
    """One task: adapters on v1 and v2, their flips, compat (and control, and the variants) with
    their snapshots, (select: compat) the snapshot chosen on validation data, the adapters of the
    other seeds; then its row: the paper's Tables 4-6 and the fight against the control."""
    from muscle_ray.report import task_row
    from muscle_ray.tasks import get_task

    cfg = p.cfg
    extra, variants = cfg.versions()[2:], [variant_version(n) for n in cfg.variants]
    trained = run.train(p, "task adapters", ["v1", "v2"])
    scored = run.score(p, "score v1/v2", ["v1", "v2"])
    trained += run.train(p, _adapters_stage(extra + (["variant"] if variants else [])), extra + variants)
    snapshots = [v for c in extra for v in p.snapshot_versions(c)]
    scored += run.score(p, f"score {'/'.join(extra)}", extra + variants + snapshots)
    cmps = compare_versions(p, ["v2", *extra, *variants, *snapshots])
    fight, plateau = fair_fight(p, cmps)
    selected, overlap = None, None
    if cfg.select == "compat":
        selected, done = select_compat(run, p, cmps)
        scored += done
    if cfg.adapter_seeds:
        overlap, more, done = seed_overlap(run, p, cmps["v2"])
        trained, scored = trained + more, scored + done
    metric = get_task(p.spec.task, **p.spec.task_options).metric
    row = task_row(
        metric,
        cmps["v2"],
        cmps["compat"],
        cmps.get("control"),
        fight=fight,
        plateau=plateau,
        flip_overlap=overlap,
        selected=selected,
        variants={n: task_row(metric, cmps["v2"], cmps[variant_version(n)]) for n in cfg.variants} or None,
    )

    # Where each product came from: the Ray Train run directory of every adapter trained here
    # (now or in an earlier run) and the Ray Data pool actors that scored each version.
    def split(summary) -> str:
        return "val" if Path(summary.out).parent.parent == p.split_results("val") else "test"

    ray_stages = {
        "train": [{"adapter": str(Path(m["config"]["out"])), **m["ray_run"]} for m in trained],
        "score": [
            {"task": p.name, "version": s.version, "rows": s.rows, "actors": s.actors, "split": split(s)}
            for s in scored
        ],
    }
    return TaskOutcome(row, {v: cmps[v] for v in ("v2", *extra)}, ray_stages)


def _adapters_stage(names: list[str]) -> str:
    """`compat adapter`, `compat and control adapters`, `compat, control and variant adapters`."""
    head = ", ".join(names[:-1])
    return f"{head + ' and ' if head else ''}{names[-1]} adapter{'s' if len(names) > 1 else ''}"


def fair_fight(p: TaskPlan, cmps: dict) -> tuple[dict | None, dict | None]:
    """Compat against the fair control, curve against curve (both start at the v2 adapter, step
    0): the row's "fight" (curves, NFR at matched accuracy, McNemar, verdict) and "plateau" (how
    far the control's CE steps moved v2's accuracy); None without the control or snapshots."""
    from muscle_ray.metrics import fight

    if not (p.curves.get("compat") and p.curves.get("control")):
        return None, None
    snaps = {
        c: [fight.Snap(0, cmps["v2"]), *(fight.Snap(step, cmps[v]) for step, v in p.curves[c])]
        for c in ("compat", "control")
    }
    return fight.fair_fight(snaps["compat"], snaps["control"]), fight.plateau(cmps["v2"], snaps["control"][1:])


def select_compat(run: UpdateRun, p: TaskPlan, cmps: dict) -> tuple[dict, list]:
    """Pick a compat snapshot on validation data, never the test set: v1, v2 and compat's
    snapshots are scored on val_data; the snapshot with the fewest negative flips among those
    within `select_floor` of v2's validation accuracy becomes version compat-selected, scored on
    test. Returns the row's "selected" (loss-based compat on test beside it) and the scorings."""
    from muscle_ray.metrics import fight

    cfg, points = p.cfg, p.curves["compat"]
    scored = run.score(p, "score on val", ["v1", "v2", *(v for _, v in points)], split="val")
    val = compare_versions(p, ["v2", *(v for _, v in points)], split="val")
    pick = fight.select_for_compat(val["v2"], [fight.Snap(step, val[v]) for step, v in points], cfg.select_floor)
    best = json.loads((p.adapters["compat"].path / "muscle_manifest.json").read_text())["best_metrics"]
    acc_v2 = val["v2"].summary["acc_new"]
    least = f"{pct(acc_v2 - cfg.select_floor)}% (v2's {pct(acc_v2)}% less {cfg.select_floor:g})"
    # compat as exported (the best validation loss), on test
    selected: dict[str, Any] = {"by": "compat", "loss": fight.point(cmps["compat"], best.get("step"))}
    if pick is None:
        selected.update(step=None, val_acc=None, val_nfr=None, floor=cfg.select_floor, val_acc_v2=acc_v2, test=None)
        selected["why"] = f"no compat snapshot reached validation accuracy {least}"
        return selected, scored
    selected.update(pick)
    selected["why"] = (
        f"step {pick['step']}: the fewest negative flips on validation data ({pct(pick['val_nfr'])}%) among "
        f"compat's snapshots with validation accuracy at least {least}; ties go to the later step"
    )
    _copy_selected(p, p.adapters[dict(points)[pick["step"]]].path, selected)
    scored += run.score(p, f"score {SELECTED}", [SELECTED])
    selected["test"] = fight.point(compare_versions(p, [SELECTED])[SELECTED], pick["step"])
    return selected, scored


def _copy_selected(p: TaskPlan, source: Path, selected: dict) -> None:
    """adapters/<task>/compat-selected: the chosen snapshot's files and a manifest saying which
    step and why (the files left as they are when they already hold that snapshot)."""
    dest = Path(p.cfg.out) / "adapters" / p.name / SELECTED
    digest = adapter_digest(source)
    manifest = _manifest(dest)
    if manifest is not None and manifest.get("source_digest") == digest:
        p.done(dest, "reused")
    else:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
        p.done(dest, f"selected step {selected['step']}")
    manifest = {"kind": SELECTED, "source": str(source), "source_digest": digest, "selected": selected}
    (dest / "muscle_manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    p.adapters[SELECTED] = Adapter(p.cfg.new, dest)


def seed_overlap(run: UpdateRun, p: TaskPlan, main: Any) -> tuple[dict, list, list]:
    """The task adapters of the other seeds on v1 and v2, scored; how much their negative flips
    overlap across seeds (flips that are the bases' doing, not the adapter seed's, recur)."""
    from muscle_ray.metrics import fight

    versions = [f"{b}-seed{k}" for k in p.cfg.adapter_seeds for b in ("v1", "v2")]
    trained = run.train(p, "seed adapters", versions)
    scored = run.score(p, "score seeds", versions)
    others = [compare_versions(p, [f"v2-seed{k}"], old=f"v1-seed{k}")[f"v2-seed{k}"] for k in p.cfg.adapter_seeds]
    return fight.flip_overlap([main, *others]), trained, scored


def compare_versions(p: TaskPlan, names: list[str], split: Literal["test", "val"] = "test", old: str = "v1") -> dict:
    """Each version against `old` (v1) on this task's eval (or validation) split: the flips."""
    from muscle_ray.metrics.compare import compare
    from muscle_ray.results import read_results

    root = p.split_results(split)
    base = read_results(root / old / p.spec.task)
    return {n: compare(base, read_results(root / n / p.spec.task), n_boot=1000) for n in names}


# --- the report and the serving config -------------------------------------------------------


def serve_config(cfg: UpdateConfig, plans: list[TaskPlan]) -> dict:
    """A Ray Serve config file (serve/config.yaml's format) hosting every task's models:
    `<task>-old` on v1, `<task>-new`, `-compat` (and `-control`) on v2."""
    bases: dict[str, dict] = {"v1": {"path": cfg.old, "models": {}}, "v2": {"path": cfg.new, "models": {}}}
    for p in plans:
        for version in cfg.versions():
            bases["v1" if version == "v1" else "v2"]["models"][f"{p.name}-{VERSIONS[version]}"] = str(
                p.adapters[version].path
            )
    first = plans[0].name
    shadow = {f"{p.name}-{v}": f"{p.name}-old" for p in plans for v in ("new", "compat")}
    gpu = {"num_gpus": 1} if cfg.scoring.backend == "vllm" or cfg.scoring.gpus_per_worker else {}
    args = {
        "bases": bases,
        "compare": {"old": f"{first}-old", "new": f"{first}-new"},
        "shadow": {"enabled": False, "pairs": shadow, "out": str(Path(cfg.out) / "serve" / "shadow")},
        "backend": cfg.scoring.backend,
    }
    deployments = [
        {"name": "gateway", "ray_actor_options": {"num_cpus": 0.25}},
        *({"name": f"model_{k}", "ray_actor_options": {"num_cpus": 0.5, **gpu}} for k in bases),
    ]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "muscle",
                "route_prefix": "/",
                "import_path": "muscle_ray.serving.app:build_app",
                "args": args,
                "deployments": deployments,
            }
        ],
    }


def write_serve_config(cfg: UpdateConfig, plans: list[TaskPlan]) -> Path:
    """`<run>/serve.yaml`, checked as `muscle serve` reads it (every model directory there)."""
    import yaml

    from muscle_ray.serving.config import read_serve_file

    path = Path(cfg.out) / "serve.yaml"
    head = (
        f"# Written by muscle update: the models of {cfg.out}, behind the OpenAI-compatible gateway.\n"
        f"#   muscle serve --config {path}       (or: serve run {path})\n"
    )
    path.write_text(head + yaml.safe_dump(serve_config(cfg, plans), sort_keys=False))
    read_serve_file(path)[0].resolved()
    return path


def ray_facts() -> dict:
    """Where the work ran, so a reader (and the tests) can see every stage went through Ray."""
    import ray

    return {
        "address": ray.get_runtime_context().gcs_address,
        "job_id": ray.get_runtime_context().get_job_id(),
        "nodes": len(ray.nodes()),
        "cluster_cpus": ray.cluster_resources().get("CPU"),
    }


def run_update(cfg: UpdateConfig, console: Console) -> dict:
    """Run the update, showing its stages on `console`; returns the report (also on disk)."""
    from muscle_ray.report import mean_over_seeds, verdict_table, write_report
    from muscle_ray.runtime import init_ray

    run = UpdateRun(console, cfg.threads, cfg.concurrent_fits)
    cfg = cfg.located()
    plans = plan(cfg)
    console.line(
        f"MUSCLE update: {cfg.old} -> {cfg.new}, tasks {', '.join(p.name for p in plans)} -> {cfg.out}"
        + (f"  (Ray's output: {console.log_path})" if console.log_path else "")
    )
    init_ray()
    with run.span("task pipelines"):
        outcomes = run.parallel([partial(task_pipeline, run, p) for p in plans])
    stages: dict[str, list] = {"train": [], "score": []}
    for o in outcomes:
        for k, v in o.ray_stages.items():
            stages[k] += v
    report = {
        "tasks": {p.name: mean_over_seeds([o.row]) for p, o in zip(plans, outcomes)},
        "seeds": [cfg.seed],
        "config": json.loads(cfg.model_dump_json()),
        "ray": {**ray_facts(), "stages": stages},
        "products": {k: v for p in plans for k, v in p.products.items()},
    }
    with run.stage("report", total=None) as stage:
        serve = write_serve_config(cfg, plans)
        report["serve"] = str(serve)
        report["timings"] = run.timings
        paths = write_report(report, {p.name: o.comparisons for p, o in zip(plans, outcomes)}, cfg.out)
        stage.note = f"{paths['md']}, {paths['html'].name}, {serve.name}"
    console.line("\n" + verdict_table(report))
    console.line(f"\nserve them: muscle serve --config {serve}")
    return report


def _import_before_threads() -> None:
    """transformers resolves its names lazily on first use, which is not thread-safe: do the
    first imports here, before the pipelines' threads race to them."""
    import peft  # noqa: F401
    import ray.train.torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    import muscle_ray.metrics.compare  # noqa: F401
    import muscle_ray.metrics.fight  # noqa: F401
    import muscle_ray.scoring.job  # noqa: F401
    import muscle_ray.training.job  # noqa: F401
    import muscle_ray.training.loop  # noqa: F401
