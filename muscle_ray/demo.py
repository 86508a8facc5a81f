"""The whole MUSCLE update on one machine: zoo -> task adapters -> flips -> compat -> report.

Every compute stage goes through Ray: the zoo is built in a Ray task, adapters are trained
with Ray Train, and results are scored by the Ray Data scoring job. Each stage's products stay
in the output folder (zoo/, adapters/, results/, report.*, logs/) for the serving and cluster parts.

The claim the demo makes is MUSCLE against a *fair control* (the v2 task adapter trained on
with plain cross-entropy for the same steps from the same start) at matched accuracy, not
only against the vanilla v2 adapter: extra training alone removes flips.

The training numbers are the recipes in muscle_ray/recipes/ (task_adapter.yaml, compat.yaml),
the same files jobs/configs/train_*.yaml use; a demo config overrides fields of them.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from muscle_ray.console import Console
from muscle_ray.recipes import merge
from muscle_ray.training.losses import MASKS
from muscle_ray.zoo.build import ZooConfig

# How each zoo task is scored: the generic tasks over the zoo's JSONL files.
SCORING = {
    "sum_mc": ("mc_jsonl", {}, "acc"),
    "sum_em": ("gen_jsonl", {"metric": "exact", "stop": ["."], "max_new_tokens": 6}, "exact"),
    "story_rouge": ("gen_jsonl", {"metric": "rouge1", "stop": ["."], "max_new_tokens": 24}, "rouge1"),
}
RECIPES = {"adapter": "task_adapter", "compat": "compat"}


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = "runs/demo"
    zoo: ZooConfig = ZooConfig()
    tasks: list[str] = list(SCORING)
    seeds: list[int] = [0]
    # Fields over the recipes, in TrainConfig's shape, e.g. {"optim": {"max_steps": 80}};
    # `compat` also makes the control (the same with compat.mask: ce).
    adapter: dict[str, Any] = {}
    compat: dict[str, Any] = {}
    ablation_task: str | None = None     # run all six masks on this task (the paper's Table 7)
    ablation_ce_weight: float = Field(0.5, ge=0, le=1)   # the paper's likelihood masks need CE (λ unstated)
    score_batch_size: int = Field(32, gt=0)
    threads: int = Field(1, gt=0)        # torch threads per train worker
    # Ray Train runs at once. On 2 cores, six concurrent fits took 2.8x the CPU per step of one
    # alone (the workers thrash); three overlap one fit's start-up with the others' compute.
    concurrent_fits: int = Field(3, gt=0)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in SCORING]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a demo task ({', '.join(SCORING)})")
        return tasks

    def train_config(self, kind: Literal["adapter", "compat"], run: dict):
        """The recipe, this config's overrides of it, then one run's paths, seed and name."""
        from muscle_ray.config import validated
        from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

        model = AdapterTrainConfig if kind == "adapter" else CompatTrainConfig
        raw = merge({"recipe": RECIPES[kind]}, getattr(self, kind), run)
        return validated(model, raw, f"demo config: {kind} (over muscle_ray/recipes/{RECIPES[kind]}.yaml)")

    def check(self) -> None:
        """Fail on a bad override before any work starts (paths are placeholders here)."""
        paths = {"base": "-", "out": "-", "data": {"path": "-"}}
        self.train_config("adapter", paths)
        self.train_config("compat", merge(paths, {"compat": {"old": {"base": "-"}, "new_adapter": "-"}}))


class DemoRun:
    """One demo run's shared state: its config, console, Ray Train slots and stage timings.

    Task pipelines run concurrently, so a stage's time is the span from its first start to its
    last end across pipelines (summing would count overlapped time twice).
    """

    def __init__(self, cfg: DemoConfig, console: Console):
        self.cfg, self.console = cfg, console
        self.out = Path(cfg.out)
        self.fit_slots = threading.BoundedSemaphore(cfg.concurrent_fits)
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

    def train_config(self, kind, base: Path, data: Path, out: Path, name: str, seed: int, **extra):
        return self.cfg.train_config(kind, merge({
            "base": str(base), "out": str(out),
            "data": {"path": str(data / "train_pairs.jsonl"), "val_path": str(data / "val_pairs.jsonl")},
            "run": {"name": name, "storage_path": str(self.out / "ray"), "seed": seed},
        }, extra))

    def fit(self, train_cfg, progress) -> dict:
        from muscle_ray.training.job import run_training

        with self.fit_slots:
            return run_training(train_cfg, threads_per_worker=self.cfg.threads, progress=progress)

    def fit_all(self, stage, configs: dict[str, Any]) -> list[dict]:
        """Fit several adapters at once (at most `concurrent_fits` across the run)."""
        with ThreadPoolExecutor(len(configs)) as pool:
            futures = [pool.submit(self.fit, c, stage.reporter(part)) for part, c in configs.items()]
            return [f.result() for f in futures]

    def score(self, stage, task: str, data: Path, out: Path, versions: dict[str, tuple[Path, Path]]):
        from muscle_ray.config import validated
        from muscle_ray.scoring.config import ScoreConfig
        from muscle_ray.scoring.job import run_score

        name, options, _ = SCORING[task]
        sc = validated(ScoreConfig, dict(
            task=name, task_options=options, data=str(data / "test.jsonl"), out=str(out),
            batch_size=self.cfg.score_batch_size, workers=1,
            versions=[{"name": v, "base": str(b), "adapter": str(a)} for v, (b, a) in versions.items()]),
            f"demo {task}")
        summaries = run_score(sc, log=self.console.log, progress=stage.advance)
        if not any(s.scored for s in summaries):
            stage.note = "all shards already on disk (a rerun resumes)"
        return summaries


def _steps(*configs) -> int | None:
    steps = [c.optim.max_steps for c in configs]
    return None if None in steps else sum(steps)


def _test_rows(data: Path) -> int:
    with open(data / "test.jsonl") as f:
        return sum(1 for line in f if line.strip())


def _compare(results: Path, task: str, names: list[str]):
    from muscle_ray.metrics.compare import compare
    from muscle_ray.results import read_results

    old = read_results(results / "v1" / SCORING[task][0])
    return {n: compare(old, read_results(results / n / SCORING[task][0]), n_boot=1000) for n in names}


def _ray_map(fn, kwargs_list, progress: dict):
    """Run calls as parallel Ray tasks (the zoo's two pretraining jobs). Half a CPU each, so
    both fit beside the zoo task itself on a 2-core machine; each trains on one thread."""
    import ray

    def call(kw):
        import torch

        torch.set_num_threads(1)
        return fn(**kw)

    remote = ray.remote(num_cpus=0.5)(call)
    return ray.get([remote.remote({**kw, "log": print, "progress": progress[kw["name"]]}) for kw in kwargs_list])


def _build_zoo_task(out: str, cfg: ZooConfig, progress: dict) -> tuple[str, str | None]:
    """The zoo, built in a Ray task (its bases pretrain as two more); returns (dir, task id)."""
    import ray

    from muscle_ray.zoo.build import build_zoo

    zoo = build_zoo(out, cfg, map_fn=lambda fn, kws: _ray_map(fn, kws, progress))
    return str(zoo), ray.get_runtime_context().get_task_id()


def _task_pipeline(run: DemoRun, task: str, seed: int, first: bool, zoo: Path):
    """One task and seed: adapters, flips, compat and control, their comparisons (and ablation)."""
    from muscle_ray.report import task_row

    cfg = run.cfg
    root = run.out if first else run.out / f"seed{seed}"
    v1, v2 = zoo / "v1", zoo / "v2"
    data, ad, res = zoo / "data" / task, root / "adapters" / task, root / "results" / task
    tag = task if len(cfg.seeds) == 1 else f"{task} seed {seed}"
    name = f"{task}-s{seed}"
    rows = _test_rows(data)
    old = {"base": str(v1), "adapter": str(ad / "v1")}
    start = {"compat": {"old": old, "new_adapter": str(ad / "v2")}}

    adapters = {"v1": run.train_config("adapter", v1, data, ad / "v1", f"{name}-v1", seed),
                "v2": run.train_config("adapter", v2, data, ad / "v2", f"{name}-v2", seed)}
    with run.stage("task adapters", tag, _steps(*adapters.values())) as stage:
        trained = run.fit_all(stage, adapters)
    with run.stage("score v1/v2", tag, 2 * rows, "rows") as stage:
        scored = run.score(stage, task, data, res, {"v1": (v1, ad / "v1"), "v2": (v2, ad / "v2")})
    compat = {"compat": run.train_config("compat", v2, data, ad / "compat", f"{name}-compat", seed, **start),
              "control": run.train_config("compat", v2, data, ad / "control", f"{name}-control", seed,
                                          **merge(start, {"compat": {"mask": "ce"}}))}
    with run.stage("compat and control adapters", tag, _steps(*compat.values())) as stage:
        trained += run.fit_all(stage, compat)
    with run.stage("score compat/control", tag, 2 * rows, "rows") as stage:
        scored += run.score(stage, task, data, res, {"compat": (v2, ad / "compat"), "control": (v2, ad / "control")})
    cmps = _compare(res, task, ["v2", "compat", "control"])
    row = task_row(SCORING[task][2], cmps["v2"], cmps["compat"], cmps["control"])
    ablation = {}
    if cfg.ablation_task == task and first:
        ablation = _ablation(run, task, v2, data, ad, res, rows, name, seed, start)
    # Where each product came from: the Ray Train run directory of every adapter and the Ray
    # Data pool actors that scored each version (the test checks these exist).
    ray_stages = {"train": [{"adapter": str(ad / Path(m["config"]["out"]).name), **m["ray_run"]} for m in trained],
                  "score": [{"task": task, "version": s.version, "rows": s.rows, "actors": s.actors} for s in scored]}
    return row, cmps, ablation, ray_stages


def _ablation(run: DemoRun, task, v2, data, ad, res, rows, name, seed, start) -> dict:
    """All six masks from the same v2 adapter and steps (the paper's Table 7).

    The likelihood masks get CE mixed in (`ablation_ce_weight`): the paper found they need it.
    """
    from muscle_ray.report import task_row

    configs = {}
    for mask in MASKS:
        weight = {"ce_weight": run.cfg.ablation_ce_weight} if mask.endswith("likelihood") else {}
        configs[mask] = run.train_config("compat", v2, data, ad / f"ablation-{mask}", f"{name}-ablation-{mask}",
                                         seed, **merge(start, {"compat": {"mask": mask, **weight}}))
    with run.stage("ablation adapters", task, _steps(*configs.values())) as stage:
        run.fit_all(stage, configs)
    with run.stage("score ablation", task, len(MASKS) * rows, "rows") as stage:
        run.score(stage, task, data, res, {f"ablation-{m}": (v2, ad / f"ablation-{m}") for m in MASKS})
    cmps = _compare(res, task, ["v2"] + [f"ablation-{m}" for m in MASKS])
    masks = {}
    for m, c in configs.items():
        label = f"{m}+ce{c.compat.ce_weight:g}" if c.compat.ce_weight else m
        masks[label] = task_row(SCORING[task][2], cmps["v2"], cmps[f"ablation-{m}"])
    return {"task": task, "nfr": cmps["v2"].summary["nfr"], "masks": masks}


def run_demo(cfg: DemoConfig, console: Console) -> dict:
    """Run the demo, showing its stages on `console`; returns the report (also on disk)."""
    import ray

    from muscle_ray.report import mean_over_seeds, verdict_table, write_report
    from muscle_ray.runtime import init_ray
    from muscle_ray.zoo.build import is_built

    cfg.check()
    # Absolute paths: Ray Train workers and pool actors do not run in this process's directory.
    cfg = cfg.model_copy(update={"out": str(Path(cfg.out).resolve())})
    run = DemoRun(cfg, console)
    out = run.out
    console.line(f"MUSCLE demo: {', '.join(cfg.tasks)}, seeds {', '.join(map(str, cfg.seeds))} -> {out}"
                 + (f"  (Ray's output: {console.log_path})" if console.log_path else ""))
    init_ray()
    reuse = is_built(out / "zoo", cfg.zoo)
    with run.stage("zoo", total=None if reuse else cfg.zoo.v1.steps + cfg.zoo.v2.steps) as stage:
        if reuse:
            stage.note = f"reused {out / 'zoo'}"
        progress = {"v1": stage.reporter("pretrain v1"), "v2": stage.reporter("pretrain v2")}
        zoo_dir, zoo_task = ray.get(ray.remote(num_cpus=0.25)(_build_zoo_task).remote(str(out / "zoo"), cfg.zoo,
                                                                                   progress))
    zoo = Path(zoo_dir)
    runs = [(task, seed, i == 0) for i, seed in enumerate(cfg.seeds) for task in cfg.tasks]
    _import_before_threads()
    with run.span("task pipelines"), ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(_task_pipeline, run, task, seed, first, zoo) for task, seed, first in runs]
        results = [f.result() for f in futures]
    rows: dict[str, list[dict]] = {t: [] for t in cfg.tasks}
    comparisons: dict[str, dict] = {}
    ablation: dict = {}
    stages = {"zoo": {"task_id": zoo_task}, "train": [], "score": []}
    for (task, _, first), (row, cmps, abl, ray_stages) in zip(runs, results):
        rows[task].append(row)
        for k, v in ray_stages.items():
            stages[k] += v
        if first:
            comparisons[task] = cmps
        ablation = ablation or abl
    report = {"tasks": {t: mean_over_seeds(r) for t, r in rows.items()}, "seeds": cfg.seeds,
              "config": json.loads(cfg.model_dump_json()), "ray": {**_ray_facts(), "stages": stages}}
    if ablation:
        report["ablation"] = ablation
    with run.stage("report", total=None) as stage:
        report["timings"] = run.timings
        paths = write_report(report, comparisons, out)
        stage.note = f"{paths['md']}, {paths['html'].name}"
    console.line("\n" + verdict_table(report))
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


def _ray_facts() -> dict:
    """Where the work ran, so a reader (and the test) can see every stage went through Ray."""
    import ray

    return {"address": ray.get_runtime_context().gcs_address, "job_id": ray.get_runtime_context().get_job_id(),
            "nodes": len(ray.nodes()), "cluster_cpus": ray.cluster_resources().get("CPU")}
