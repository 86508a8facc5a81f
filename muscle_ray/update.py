"""`muscle update`: the whole MUSCLE update for two base versions of any model.

    task adapters on v1 and v2 -> flip scoring of v1/v2 -> compat adapter (and the CE control)
    -> scoring of compat (and control) -> report.json/md/html -> serve.yaml

Adapters train with Ray Train, results are scored by the Ray Data scoring job, each stage is one
console line. Every product stays in the run folder::

    adapters/<task>/{v1,v2,compat,control}/   PEFT adapters, each with muscle_manifest.json
    results/<task>/<version>/                 results-format Parquet shards
    report.json, report.md, report.html       the paper's Tables 4-6, one row per task
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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from muscle_ray.console import Console
from muscle_ray.errors import MuscleError
from muscle_ray.model_sources import ModelName
from muscle_ray.recipes import merge

RECIPES = {"adapter": "task_adapter", "compat": "compat"}
VERSIONS = {"v1": "old", "v2": "new", "compat": "compat", "control": "control"}  # folder -> served name
INPUTS = "_inputs.json"  # beside a version's results: what they scored
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
    workers: tuple[int, int] = (1, 1)  # N, or MIN,MAX: the actor pool autoscales
    limit: int | None = Field(None, gt=0)  # the first N eval rows of each task
    backend: Literal["hf", "vllm"] = "hf"
    cpus_per_worker: float = Field(0.25, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v):
        """N, MIN,MAX or a pair, as `muscle score --workers` reads them."""
        from muscle_ray.scoring.config import ScoreConfig

        return ScoreConfig._workers(v)

    @field_validator("workers")
    @classmethod
    def _pool(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
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
    scoring: ScoringSettings = ScoringSettings()
    threads: int = Field(1, gt=0)  # torch threads per train worker
    concurrent_fits: int = Field(3, gt=0)  # Ray Train runs at once

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two tasks named {', '.join(dup)}; give each its own name")
        return tasks

    @model_validator(mode="after")
    def _recipes(self):
        """A bad recipe override fails here, when the config is read, not after hours of work."""
        try:
            check_overrides(self.adapter, self.compat)
        except MuscleError as e:
            raise ValueError(str(e)) from None
        return self

    def versions(self) -> list[str]:
        return ["v1", "v2", "compat"] + (["control"] if self.control else [])

    def located(self) -> "UpdateConfig":
        """This config with the run folder and local model directories absolute (under
        MUSCLE_WORKSPACE when relative): Ray workers and submitted jobs run elsewhere."""
        return self.model_copy(update={"out": _local(self.out), "old": _model(self.old), "new": _model(self.new)})


def check_overrides(adapter: dict, compat: dict, source: str | None = None) -> None:
    """Fail on a bad recipe override before any work starts (paths are placeholders here)."""
    paths = {"base": "-", "out": "-", "data": {"path": "-"}}
    train_config("adapter", adapter, compat, paths, source)
    train_config(
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
    products: dict[str, str] = field(default_factory=dict)  # what this run did to each product

    @property
    def name(self) -> str:
        return self.spec.name

    def done(self, path: Path, what: str) -> None:
        """Record what happened to a product (trained, reused, given, scored N), by its path in the run."""
        root = Path(self.cfg.out)
        self.products[str(path.relative_to(root)) if path.is_relative_to(root) else str(path)] = what

    def compat_adapter(self, version: str, **compat: Any) -> Adapter:
        """A compat-recipe adapter on v2 from the v2 task adapter, `compat` over the recipe's
        compat fields (`mask="ce"`: the control)."""
        cfg, root = self.cfg, Path(self.cfg.out)
        start = {
            "old": {"base": cfg.old, "adapter": str(self.adapters["v1"].path)},
            "new_adapter": str(self.adapters["v2"].path),
            **compat,
        }
        path = root / "adapters" / self.name / version
        run = _run_fields(cfg, self.spec, path, version, cfg.seed)
        return Adapter(cfg.new, path, train_config("compat", cfg.adapter, cfg.compat, merge(run, {"compat": start})))


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


def _run_fields(cfg: UpdateConfig, spec: TaskSpec, out: Path, version: str, seed: int) -> dict:
    data = spec.training_data()
    for k in ("path", "val_path", "data_root"):
        if data.get(k) is not None:
            data[k] = _local(data[k])
    return {
        "base": cfg.old if version == "v1" else cfg.new,
        "out": str(out),
        "data": data,
        "run": {"name": f"{spec.name}-s{cfg.seed}-{version}", "storage_path": str(Path(cfg.out) / "ray"), "seed": seed},
    }


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
        for version, given, seed in (
            ("v1", spec.old_adapter, cfg.seed),
            ("v2", spec.new_adapter, cfg.seed if cfg.new_seed is None else cfg.new_seed),
        ):
            base = cfg.old if version == "v1" else cfg.new
            if given is not None:
                ModelVersion(base, _local(given), name=version)  # a PEFT directory
                adapters[version] = Adapter(base, Path(_local(given)))
            else:
                path = root / "adapters" / spec.name / version
                run = _run_fields(cfg, spec, path, version, seed)
                adapters[version] = Adapter(
                    base, path, train_config("adapter", cfg.adapter, cfg.compat, run, f"task {spec.name}")
                )
        task = get_task(spec.task, **spec.task_options)
        if spec.data:
            data = _local(spec.data)
        else:  # TaskSpec checked there are both
            assert spec.data_root and task.default_path
            data = str(Path(_local(spec.data_root)) / task.default_path)
        if not Path(data).exists():
            raise MuscleError(f"task {spec.name}: {data}: no such eval file")
        rows = sum(1 for _ in islice(task.records(data), cfg.scoring.limit))
        p = TaskPlan(cfg, spec, spec.name + suffix, adapters, data, rows, root / "results" / spec.name)
        p.adapters["compat"] = p.compat_adapter("compat")
        if cfg.control:
            p.adapters["control"] = p.compat_adapter("control", mask="ce")
        plans.append(p)
    return plans


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
    config = train.model_dump(exclude={"out": True, "run": {"name", "storage_path"}})
    for k in ("path", "val_path", "data_root"):
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


def results_key(plan: TaskPlan, version: str) -> str:
    """A result set's inputs key: the model version (its content, and where it is, as the scoring
    job's own check of a resumed run has it) and how it was scored."""
    a, s = plan.adapters[version], plan.cfg.scoring
    return _key(
        {
            "base": _base(a.base),
            "adapter": adapter_digest(a.path),
            "where": [a.base, str(a.path)],
            "task": plan.spec.task,
            "task_options": plan.spec.task_options,
            "data": content_digest(plan.data),
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

    def score(self, plan: TaskPlan, name: str, versions: list[str], who: str | None = None):
        """Score model versions of one task: results of other inputs are removed first, finished
        shards of the same inputs are kept (the scoring job resumes)."""
        from muscle_ray.config import validated
        from muscle_ray.scoring.config import ScoreConfig
        from muscle_ray.scoring.job import run_score

        for v in versions:
            key, d = results_key(plan, v), plan.results / v
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
                data=plan.data,
                out=str(plan.results),
                limit=s.limit,
                batch_size=s.batch_size,
                workers=s.workers,
                backend=s.backend,
                cpus_per_worker=s.cpus_per_worker,
                gpus_per_worker=s.gpus_per_worker,
                chat_template=spec.chat_template,
                versions=[
                    {"name": v, "base": plan.adapters[v].base, "adapter": str(plan.adapters[v].path)} for v in versions
                ],
            ),
            f"task {plan.name}",
        )
        with self.stage(name, who or plan.tag, len(versions) * plan.rows, "rows") as stage:
            summaries = run_score(sc, log=self.console.log, progress=stage.advance)
            if not any(x.scored for x in summaries):
                stage.note = "reused: every shard on disk"
        for x in summaries:
            plan.done(plan.results / x.version, f"scored {x.scored}" if x.scored else "reused")
        return summaries


def task_pipeline(run: UpdateRun, p: TaskPlan) -> TaskOutcome:
    """One task: adapters on v1 and v2, their flips, compat (and control), their comparisons."""
    from muscle_ray.report import task_row
    from muscle_ray.tasks import get_task

    extra = p.cfg.versions()[2:]
    trained = run.train(p, "task adapters", ["v1", "v2"])
    scored = run.score(p, "score v1/v2", ["v1", "v2"])
    trained += run.train(p, f"{' and '.join(extra)} adapter{'s' if len(extra) > 1 else ''}", extra)
    scored += run.score(p, f"score {'/'.join(extra)}", extra)
    cmps = compare_versions(p, ["v2", *extra])
    metric = get_task(p.spec.task, **p.spec.task_options).metric
    row = task_row(metric, cmps["v2"], cmps["compat"], cmps.get("control"))
    # Where each product came from: the Ray Train run directory of every adapter trained here
    # (now or in an earlier run) and the Ray Data pool actors that scored each version.
    ray_stages = {
        "train": [{"adapter": str(Path(m["config"]["out"])), **m["ray_run"]} for m in trained],
        "score": [{"task": p.name, "version": s.version, "rows": s.rows, "actors": s.actors} for s in scored],
    }
    return TaskOutcome(row, cmps, ray_stages)


def compare_versions(p: TaskPlan, names: list[str]) -> dict:
    """Each version against v1 on this task (the flips)."""
    from muscle_ray.metrics.compare import compare
    from muscle_ray.results import read_results

    old = read_results(p.results / "v1" / p.spec.task)
    return {n: compare(old, read_results(p.results / n / p.spec.task), n_boot=1000) for n in names}


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
    import muscle_ray.scoring.job  # noqa: F401
    import muscle_ray.training.job  # noqa: F401
    import muscle_ray.training.loop  # noqa: F401
