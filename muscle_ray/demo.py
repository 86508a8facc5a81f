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
import time
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
    """The task-adapter recipe, identical for v1 and v2 (the paper's setting)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, gt=0)
    lr: float = Field(2e-3, gt=0)
    epochs: int = Field(3, gt=0)
    micro_batch_size: int = Field(32, gt=0)
    warmup_steps: int = Field(20, ge=0)


class CompatRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mask: Literal[MASKS] = "muscle"
    temperature: float = Field(2.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, le=1)
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(200, gt=0)
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
    threads: int = Field(2, gt=0)


class Stopwatch:
    """Per-stage wall time, and one progress line per stage as it starts and ends."""

    def __init__(self, log=print):
        self.timings: dict[str, float] = {}
        self.log = log
        self.t0 = time.perf_counter()

    def stage(self, name: str):
        watch = self

        class _Stage:
            def __enter__(self):
                self.t = time.perf_counter()
                watch.log(f"[demo +{self.t - watch.t0:5.0f}s] {name} ...")

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t
                watch.timings[name] = watch.timings.get(name, 0.0) + dt
                if exc[0] is None:
                    watch.log(f"[demo +{time.perf_counter() - watch.t0:5.0f}s] {name} done in {dt:.1f}s")

        return _Stage()


def _train(cfg: DemoConfig, base: Path, data: Path, out: Path, name: str, seed: int, compat: dict | None = None,
           steps: int | None = None):
    from muscle_ray.training.config import validate_config
    from muscle_ray.training.job import run_training

    a, c = cfg.adapter, cfg.compat
    raw = {
        "base": str(base), "out": str(out),
        "data": {"path": str(data / "train_pairs.jsonl"), "val_path": str(data / "val_pairs.jsonl"), "max_length": 128},
        "lora": {"r": a.r, "alpha": 2 * a.r},
        "optim": {"lr": a.lr, "epochs": a.epochs, "micro_batch_size": a.micro_batch_size,
                  "warmup_steps": a.warmup_steps, "schedule": "linear"},
        "run": {"name": name, "storage_path": str(Path(cfg.out) / "ray"), "seed": seed, "cpus_per_worker": 0.5},
    }
    if compat is not None:
        raw["optim"] = {"lr": c.lr, "max_steps": steps or c.steps, "epochs": 100, "micro_batch_size": c.micro_batch_size,
                        "warmup_steps": 0, "schedule": "constant"}
        raw["run"]["eval_every_steps"] = steps or c.steps
        raw["compat"] = compat
    return run_training(validate_config(raw, "compat" if compat else "adapter", source=f"demo {name}"),
                        threads_per_worker=cfg.threads)


def _score(cfg: DemoConfig, task: str, data: Path, out: Path, versions: dict[str, tuple[Path, Path | None]]):
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score

    name, options, _ = SCORING[task]
    sc = ScoreConfig.build(
        f"demo {task}", task=name, task_options=options, data=str(data / "test.jsonl"), out=str(out),
        batch_size=cfg.score_batch_size, workers=1,
        versions=[{"name": v, "base": str(b), "adapter": str(a) if a else None} for v, (b, a) in versions.items()])
    run_score(sc, log=lambda m: None)


def _compare(results: Path, task: str, names: list[str]):
    from muscle_ray.metrics.compare import compare
    from muscle_ray.results import read_results

    old = read_results(results / "v1" / SCORING[task][0])
    return {n: compare(old, read_results(results / n / SCORING[task][0]), n_boot=1000) for n in names}


def run_demo(cfg: DemoConfig, log=print) -> dict:
    import ray

    from muscle_ray.report import mean_over_seeds, task_row, write_report
    from muscle_ray.runtime import init_ray
    from muscle_ray.zoo.build import build_zoo

    out = Path(cfg.out)
    watch = Stopwatch(log)
    init_ray()
    with watch.stage("zoo"):
        zoo = Path(ray.get(ray.remote(num_cpus=1)(build_zoo).remote(str(out / "zoo"), cfg.zoo)))
    v1, v2 = zoo / "v1", zoo / "v2"
    rows: dict[str, list[dict]] = {t: [] for t in cfg.tasks}
    comparisons: dict[str, dict] = {}
    ablation: dict[str, dict] = {}
    for i, seed in enumerate(cfg.seeds):
        root = out if i == 0 else out / f"seed{seed}"
        for task in cfg.tasks:
            data, ad, res = zoo / "data" / task, root / "adapters" / task, root / "results" / task
            tag = f"{task}-s{seed}"
            with watch.stage("task adapters"):
                for v, base in (("v1", v1), ("v2", v2)):
                    _train(cfg, base, data, ad / v, f"{tag}-{v}", seed)
            with watch.stage("score v1/v2"):
                _score(cfg, task, data, res, {"v1": (v1, ad / "v1"), "v2": (v2, ad / "v2")})
            c = cfg.compat
            old = {"base": str(v1), "adapter": str(ad / "v1")}
            with watch.stage("compat adapter"):
                _train(cfg, v2, data, ad / "compat", f"{tag}-compat", seed,
                       compat={"old": old, "new_adapter": str(ad / "v2"), "mask": c.mask,
                               "temperature": c.temperature, "ce_weight": c.ce_weight})
            with watch.stage("control adapter"):
                _train(cfg, v2, data, ad / "control", f"{tag}-control", seed,
                       compat={"old": old, "new_adapter": str(ad / "v2"), "mask": "ce"})
            with watch.stage("score compat/control"):
                _score(cfg, task, data, res, {"compat": (v2, ad / "compat"), "control": (v2, ad / "control")})
            with watch.stage("metrics"):
                cmps = _compare(res, task, ["v2", "compat", "control"])
                rows[task].append(task_row(SCORING[task][2], cmps["v2"], cmps["compat"], cmps["control"]))
                comparisons.setdefault(task, cmps)
            if cfg.ablation_task == task and i == 0:
                ablation = _ablation(cfg, task, v1, v2, data, ad, res, old, watch, seed)
    report = {"tasks": {t: mean_over_seeds(r) for t, r in rows.items()}, "seeds": cfg.seeds,
              "config": json.loads(cfg.model_dump_json()), "timings": watch.timings}
    if ablation:
        report["ablation"] = ablation
    with watch.stage("report"):
        paths = write_report(report, comparisons, out)
    report["timings"] = watch.timings
    paths["json"].write_text(json.dumps(report, indent=2))
    log("\n" + (out / "report.md").read_text())
    log(f"report: {paths['html']}")
    return report


def _ablation(cfg, task, v1, v2, data, ad, res, old, watch, seed) -> dict:
    """All six masks from the same v2 adapter and steps (the paper's Table 7)."""
    from muscle_ray.report import task_row

    c = cfg.compat
    masks = {}
    for mask in MASKS:
        w = cfg.compat.ablation_ce_weight if mask.endswith("likelihood") else c.ce_weight
        label = mask if not w else f"{mask}+ce{w:g}"
        with watch.stage("ablation"):
            _train(cfg, v2, data, ad / f"ablation-{mask}", f"{task}-s{seed}-ablation-{mask}", seed,
                   compat={"old": old, "new_adapter": str(ad / "v2"), "mask": mask,
                           "temperature": c.temperature, "ce_weight": w})
            _score(cfg, task, data, res, {f"ablation-{mask}": (v2, ad / f"ablation-{mask}")})
            cmps = _compare(res, task, ["v2", f"ablation-{mask}"])
            masks[label] = task_row(SCORING[task][2], cmps["v2"], cmps[f"ablation-{mask}"])
    first = next(iter(masks.values()))
    return {"task": task, "nfr": first["nfr"], "masks": masks}
