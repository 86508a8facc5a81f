"""The whole MUSCLE update on one machine: zoo -> task adapters -> flips -> compat -> report.

Every compute stage goes through Ray: the zoo is built in a Ray task, adapters are trained
with Ray Train, and results are scored by the Ray Data scoring job. Each stage's products stay
in the output folder (zoo/, adapters/, results/, report.*) for the serving and cluster parts.

The claim the demo makes is MUSCLE against a *fair control* (the v2 task adapter trained on
with plain cross-entropy for the same steps from the same start) at matched accuracy, not
only against the vanilla v2 adapter: extra training alone removes flips.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from muscle_ray.training.losses import MASKS
from muscle_ray.zoo.build import ZooConfig

# How each zoo task is scored: the generic tasks over the zoo's JSONL files.
SCORING = {
    "sum_mc": ("mc_jsonl", {}, "acc"),
    "sum_em": ("gen_jsonl", {"metric": "exact", "stop": ["."], "max_new_tokens": 6}, "exact"),
    "story_rouge": ("gen_jsonl", {"metric": "rouge1", "stop": ["."], "max_new_tokens": 24}, "rouge1"),
}


class AdapterRecipe(BaseModel):
    """The task-adapter recipe, identical for v1 and v2 (the paper's setting).

    Trained to a validation-loss plateau (cosine decay to zero; the best of the periodic
    evaluations is exported), so that extra training alone cannot explain what compat does.
    The loss is on the completion only: the prompts' random names are noise the val loss
    would otherwise be dominated by.
    """

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0)
    lr: float = Field(2e-3, gt=0)
    steps: int = Field(1200, gt=0)
    eval_every: int = Field(200, gt=0)
    micro_batch_size: int = Field(32, gt=0)
    warmup_steps: int = Field(20, ge=0)
    loss_on: Literal["all", "completion"] = "completion"


class CompatRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mask: Literal[MASKS] = "muscle"
    temperature: float = Field(2.0, gt=0)
    ce_weight: float = Field(0.5, ge=0, le=1)   # the paper's λ is unstated; pure KL lost accuracy here
    lr: float = Field(5e-4, gt=0)      # cosine to zero: at a constant 1e-3 even the CE control lost accuracy
    steps: int = Field(300, gt=0)
    micro_batch_size: int = Field(32, gt=0)
    ablation_ce_weight: float = Field(0.5, ge=0, le=1)   # the paper's likelihood masks need CE (λ unstated)


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = "runs/demo"
    zoo: ZooConfig = ZooConfig()
    tasks: list[Literal[tuple(SCORING)]] = list(SCORING)
    seeds: list[int] = [0]
    adapter: AdapterRecipe = AdapterRecipe()
    compat: CompatRecipe = CompatRecipe()
    ablation_task: str | None = None     # run all six masks on this task (the paper's Table 7)
    score_batch_size: int = Field(32, gt=0)
    threads: int = Field(1, gt=0)        # torch threads per train worker
    # Ray Train runs at once. On 2 cores, six concurrent fits took 2.8x the CPU per step of one
    # alone (the workers thrash); three overlap one fit's start-up with the others' compute.
    concurrent_fits: int = Field(3, gt=0)


class Stopwatch:
    """Progress lines per stage, and each stage's wall-clock span.

    Task pipelines run concurrently, so a stage's time is the span from its first start to its
    last end across pipelines (summing would count overlapped time twice).
    """

    def __init__(self, log=print):
        self.spans: dict[str, list[float]] = {}
        self.log = log
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    @property
    def timings(self) -> dict[str, float]:
        return {k: round(end - start, 1) for k, (start, end) in self.spans.items()}

    @contextmanager
    def stage(self, name: str, who: str = ""):
        t = time.perf_counter()
        label = f"{who}: {name}" if who else name
        self.log(f"[demo +{t - self.t0:5.0f}s] {label} ...")
        yield
        end = time.perf_counter()
        with self._lock:
            start0, end0 = self.spans.get(name, (t, end))
            self.spans[name] = [min(start0, t), max(end0, end)]
        self.log(f"[demo +{end - self.t0:5.0f}s] {label} done in {end - t:.1f}s")


def _both(f, g):
    """Run two independent stages at once (v1 and v2 adapters; compat and control)."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(f), pool.submit(g)
        return a.result(), b.result()


_fit_slots = threading.BoundedSemaphore(3)


def _train(cfg: DemoConfig, base: Path, data: Path, out: Path, name: str, seed: int, compat: dict | None = None,
           steps: int | None = None):
    from muscle_ray.config import validated
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig
    from muscle_ray.training.job import run_training

    a, c = cfg.adapter, cfg.compat
    raw = {
        "base": str(base), "out": str(out),
        "data": {"path": str(data / "train_pairs.jsonl"), "val_path": str(data / "val_pairs.jsonl"),
                 "max_length": 96, "loss_on": a.loss_on},
        "lora": {"r": a.r, "alpha": 2 * a.r},
        "optim": {"lr": a.lr, "max_steps": a.steps, "epochs": 1000, "micro_batch_size": a.micro_batch_size,
                  "warmup_steps": a.warmup_steps, "schedule": "cosine"},
        "run": {"name": name, "storage_path": str(Path(cfg.out) / "ray"), "seed": seed, "cpus_per_worker": 0.25,
                "eval_every_steps": a.eval_every, "log_every_steps": 100},
    }
    if compat is not None:
        raw["optim"] = {"lr": c.lr, "max_steps": steps or c.steps, "epochs": 100, "micro_batch_size": c.micro_batch_size,
                        "warmup_steps": 0, "schedule": "cosine"}
        raw["run"]["eval_every_steps"] = steps or c.steps
        raw["compat"] = compat
    train_cfg = validated(CompatTrainConfig if compat else AdapterTrainConfig, raw, f"demo {name}")
    with _fit_slots:
        return run_training(train_cfg, threads_per_worker=cfg.threads)


def _score(cfg: DemoConfig, task: str, data: Path, out: Path, versions: dict[str, tuple[Path, Path | None]]):
    from muscle_ray.config import validated
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score

    name, options, _ = SCORING[task]
    sc = validated(ScoreConfig, dict(
        task=name, task_options=options, data=str(data / "test.jsonl"), out=str(out),
        batch_size=cfg.score_batch_size, workers=1,
        versions=[{"name": v, "base": str(b), "adapter": str(a) if a else None} for v, (b, a) in versions.items()]),
        f"demo {task}")
    return run_score(sc, log=lambda m: None)


def _compare(results: Path, task: str, names: list[str]):
    from muscle_ray.metrics.compare import compare
    from muscle_ray.results import read_results

    old = read_results(results / "v1" / SCORING[task][0])
    return {n: compare(old, read_results(results / n / SCORING[task][0]), n_boot=1000) for n in names}


def _ray_map(fn, kwargs_list):
    """Run calls as parallel Ray tasks (the zoo's two pretraining jobs). Half a CPU each, so
    both fit beside the zoo task itself on a 2-core machine; each trains on one thread."""
    import ray

    def call(kw):
        import torch

        torch.set_num_threads(1)
        return fn(**kw)

    remote = ray.remote(num_cpus=0.5)(call)
    return ray.get([remote.remote({**kw, "log": print}) for kw in kwargs_list])


def _build_zoo_task(out: str, cfg: ZooConfig) -> tuple[str, str]:
    """The zoo, built in a Ray task (its bases pretrain as two more); returns (dir, task id)."""
    import ray

    from muscle_ray.zoo.build import build_zoo

    return str(build_zoo(out, cfg, map_fn=_ray_map)), ray.get_runtime_context().get_task_id()


def _task_pipeline(cfg: DemoConfig, task: str, seed: int, first: bool, zoo: Path, watch: Stopwatch):
    """One task and seed: adapters, flips, compat and control, their comparisons (and ablation)."""
    from muscle_ray.report import task_row

    root = Path(cfg.out) if first else Path(cfg.out) / f"seed{seed}"
    v1, v2 = zoo / "v1", zoo / "v2"
    data, ad, res = zoo / "data" / task, root / "adapters" / task, root / "results" / task
    tag, c = f"{task}-s{seed}", cfg.compat
    old = {"base": str(v1), "adapter": str(ad / "v1")}
    trained, scored = [], []
    with watch.stage("task adapters", tag):
        trained += _both(lambda: _train(cfg, v1, data, ad / "v1", f"{tag}-v1", seed),
                         lambda: _train(cfg, v2, data, ad / "v2", f"{tag}-v2", seed))
    with watch.stage("score v1/v2", tag):
        scored += _score(cfg, task, data, res, {"v1": (v1, ad / "v1"), "v2": (v2, ad / "v2")})
    with watch.stage("compat and control adapters", tag):
        trained += _both(lambda: _train(cfg, v2, data, ad / "compat", f"{tag}-compat", seed,
                             compat={"old": old, "new_adapter": str(ad / "v2"), "mask": c.mask,
                                     "temperature": c.temperature, "ce_weight": c.ce_weight}),
              lambda: _train(cfg, v2, data, ad / "control", f"{tag}-control", seed,
                             compat={"old": old, "new_adapter": str(ad / "v2"), "mask": "ce"}))
    with watch.stage("score compat/control", tag):
        scored += _score(cfg, task, data, res, {"compat": (v2, ad / "compat"), "control": (v2, ad / "control")})
    cmps = _compare(res, task, ["v2", "compat", "control"])
    row = task_row(SCORING[task][2], cmps["v2"], cmps["compat"], cmps["control"])
    ablation = {}
    if cfg.ablation_task == task and first:
        with watch.stage("ablation", tag):
            ablation = _ablation(cfg, task, v1, v2, data, ad, res, old, seed)
    # Where each product came from: the Ray Train run directory of every adapter and the Ray
    # Data pool actors that scored each version (the test checks these exist).
    ray_stages = {"train": [{"adapter": str(ad / Path(m["config"]["out"]).name), **m["ray_run"]} for m in trained],
                  "score": [{"task": task, "version": s.version, "rows": s.rows, "actors": s.actors} for s in scored]}
    return row, cmps, ablation, ray_stages


def run_demo(cfg: DemoConfig, log=print) -> dict:
    import ray

    from muscle_ray.report import mean_over_seeds, write_report
    from muscle_ray.runtime import init_ray

    global _fit_slots
    _fit_slots = threading.BoundedSemaphore(cfg.concurrent_fits)
    # Absolute paths: Ray Train workers and pool actors do not run in this process's directory.
    cfg = cfg.model_copy(update={"out": str(Path(cfg.out).resolve())})
    out = Path(cfg.out)
    watch = Stopwatch(log)
    init_ray()
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)   # the stages print their own progress
    ray.data.DataContext.get_current().enable_progress_bars = False
    with watch.stage("zoo"):
        zoo, zoo_task = ray.get(ray.remote(num_cpus=0.25)(_build_zoo_task).remote(str(out / "zoo"), cfg.zoo))
        zoo = Path(zoo)
    runs = [(task, seed, i == 0) for i, seed in enumerate(cfg.seeds) for task in cfg.tasks]
    _import_before_threads()
    with watch.stage("task pipelines"), ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(_task_pipeline, cfg, task, seed, first, zoo, watch) for task, seed, first in runs]
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
    with watch.stage("report"):
        report["timings"] = {**watch.timings, "total": round(time.perf_counter() - watch.t0, 1)}
        paths = write_report(report, comparisons, out)
    log("\n" + (out / "report.md").read_text())
    log(f"report: {paths['html']}")
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


def _ablation(cfg, task, v1, v2, data, ad, res, old, seed) -> dict:
    """All six masks from the same v2 adapter and steps (the paper's Table 7).

    The likelihood masks get CE mixed in (`ablation_ce_weight`): the paper found they need it.
    """
    from muscle_ray.report import task_row

    c = cfg.compat
    weights = {m: c.ablation_ce_weight if m.endswith("likelihood") else c.ce_weight for m in MASKS}

    def train(mask):
        _train(cfg, v2, data, ad / f"ablation-{mask}", f"{task}-s{seed}-ablation-{mask}", seed,
               compat={"old": old, "new_adapter": str(ad / "v2"), "mask": mask,
                       "temperature": c.temperature, "ce_weight": weights[mask]})

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(train, MASKS))
    _score(cfg, task, data, res, {f"ablation-{m}": (v2, ad / f"ablation-{m}") for m in MASKS})
    cmps = _compare(res, task, ["v2"] + [f"ablation-{m}" for m in MASKS])
    masks = {(m if not weights[m] else f"{m}+ce{weights[m]:g}"): task_row(SCORING[task][2], cmps["v2"], cmps[f"ablation-{m}"])
             for m in MASKS}
    return {"task": task, "nfr": cmps["v2"].summary["nfr"], "masks": masks}
