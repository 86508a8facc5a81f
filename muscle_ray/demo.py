"""The whole MUSCLE update on one machine, over a synthetic zoo: `muscle update` in miniature.

The demo builds (or reuses) the zoo -- two small Llama bases pretrained from scratch and three
tasks -- writes an UpdateConfig for it and runs the update pipeline of muscle_ray/update.py:
task adapters -> flips -> compat and control -> report -> serve.yaml. Only what the demo adds
wraps it: the zoo (built in a Ray task), several adapter seeds (the report's mean and spread)
and the masking ablation (the paper's Table 7).

The claim the demo makes is MUSCLE against a *fair control* (the v2 task adapter trained on
with plain cross-entropy for the same steps from the same start) at matched accuracy, not
only against the vanilla v2 adapter: extra training alone removes flips.

The training numbers are the recipes in muscle_ray/recipes/ (task_adapter.yaml, compat.yaml),
the same files jobs/configs/train_*.yaml use; a demo config overrides fields of them.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from muscle_ray.console import Console
from muscle_ray.training.losses import MASKS
from muscle_ray.update import TaskOutcome, TaskPlan, UpdateConfig, UpdateRun, check_overrides, train_config
from muscle_ray.zoo.build import ZooConfig

# How each zoo task is scored: the generic tasks over the zoo's JSONL files (task, options, metric).
SCORING = {
    "sum_mc": ("mc_jsonl", {}, "acc"),
    "sum_em": ("gen_jsonl", {"metric": "exact", "stop": ["."], "max_new_tokens": 6}, "exact"),
    "story_rouge": ("gen_jsonl", {"metric": "rouge1", "stop": ["."], "max_new_tokens": 24}, "rouge1"),
}


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
    ablation_task: str | None = None  # run all six masks on this task (the paper's Table 7)
    ablation_ce_weight: float = Field(0.5, ge=0, le=1)  # the paper's likelihood masks need CE (λ unstated)
    score_batch_size: int = Field(32, gt=0)
    threads: int = Field(1, gt=0)  # torch threads per train worker
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
        return train_config(kind, self.adapter, self.compat, run, "demo config")

    def check(self) -> None:
        """Fail on a bad override before any work starts (before the zoo is built)."""
        check_overrides(self.adapter, self.compat, "demo config")

    def update_config(self, zoo: Path, seed: int, out: Path) -> UpdateConfig:
        """The update the demo runs for one adapter seed: the zoo's bases and tasks."""
        tasks = [
            {
                "name": t,
                "task": SCORING[t][0],
                "task_options": SCORING[t][1],
                "data": str(zoo / "data" / t / "test.jsonl"),
                "train": {
                    "path": str(zoo / "data" / t / "train_pairs.jsonl"),
                    "val_path": str(zoo / "data" / t / "val_pairs.jsonl"),
                },
            }
            for t in self.tasks
        ]
        return UpdateConfig(
            out=str(out),
            old=str(zoo / "v1"),
            new=str(zoo / "v2"),
            tasks=tasks,
            adapter=self.adapter,
            compat=self.compat,
            control=True,
            seed=seed,
            scoring={"batch_size": self.score_batch_size, "workers": 1},
            threads=self.threads,
            concurrent_fits=self.concurrent_fits,
        )


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


def _pipeline(run: UpdateRun, p: TaskPlan, ablation_ce_weight: float | None) -> tuple[TaskOutcome, dict]:
    """One task and seed through the update pipeline, then (given a weight) its ablation."""
    from muscle_ray.update import task_pipeline

    outcome = task_pipeline(run, p)
    return outcome, ({} if ablation_ce_weight is None else _ablation(run, p, ablation_ce_weight))


def _ablation(run: UpdateRun, p: TaskPlan, ce_weight: float) -> dict:
    """All six masks from the same v2 adapter and steps (the paper's Table 7).

    The likelihood masks get CE mixed in (`ce_weight`): the paper found they need it.
    """
    from muscle_ray.report import task_row
    from muscle_ray.update import compare_versions

    names = [f"ablation-{m}" for m in MASKS]
    for mask, name in zip(MASKS, names):
        weight = {"ce_weight": ce_weight} if mask.endswith("likelihood") else {}
        p.adapters[name] = p.compat_adapter(name, mask=mask, **weight)
    run.train(p, "ablation adapters", names, who=p.name)
    run.score(p, "score ablation", names, who=p.name)
    cmps = compare_versions(p, ["v2", *names])
    masks = {}
    for mask, name in zip(MASKS, names):
        w = p.adapters[name].train.compat.ce_weight
        masks[f"{mask}+ce{w:g}" if w else mask] = task_row(SCORING[p.name][2], cmps["v2"], cmps[name])
    return {"task": p.name, "nfr": cmps["v2"].summary["nfr"], "masks": masks}


def run_demo(cfg: DemoConfig, console: Console) -> dict:
    """Run the demo, showing its stages on `console`; returns the report (also on disk)."""
    import ray

    from muscle_ray.report import mean_over_seeds, verdict_table, write_report
    from muscle_ray.runtime import init_ray
    from muscle_ray.update import plan, ray_facts, write_serve_config
    from muscle_ray.zoo.build import is_built

    cfg.check()
    # Absolute paths: Ray Train workers and pool actors do not run in this process's directory.
    cfg = cfg.model_copy(update={"out": str(Path(cfg.out).resolve())})
    run = UpdateRun(console, cfg.threads, cfg.concurrent_fits)
    out = Path(cfg.out)
    console.line(
        f"MUSCLE demo: {', '.join(cfg.tasks)}, seeds {', '.join(map(str, cfg.seeds))} -> {out}"
        + (f"  (Ray's output: {console.log_path})" if console.log_path else "")
    )
    init_ray()
    reuse = is_built(out / "zoo", cfg.zoo)
    with run.stage("zoo", total=None if reuse else cfg.zoo.v1.steps + cfg.zoo.v2.steps) as stage:
        if reuse:
            stage.note = f"reused {out / 'zoo'}"
        progress = {"v1": stage.reporter("pretrain v1"), "v2": stage.reporter("pretrain v2")}
        zoo_dir, zoo_task = ray.get(
            ray.remote(num_cpus=0.25)(_build_zoo_task).remote(str(out / "zoo"), cfg.zoo, progress)
        )
    zoo = Path(zoo_dir)
    # Seed 0 in the run folder itself (the layout `muscle update` writes), later seeds beside it.
    updates = [cfg.update_config(zoo, seed, out if i == 0 else out / f"seed{seed}") for i, seed in enumerate(cfg.seeds)]
    plans = [
        (i, p) for i, u in enumerate(updates) for p in plan(u, suffix="" if len(cfg.seeds) == 1 else f" seed {u.seed}")
    ]
    with run.span("task pipelines"):
        results = run.parallel(
            [
                partial(_pipeline, run, p, cfg.ablation_ce_weight if i == 0 and p.name == cfg.ablation_task else None)
                for i, p in plans
            ]
        )
    rows: dict[str, list[dict]] = {t: [] for t in cfg.tasks}
    ablation: dict = {}
    stages: dict[str, Any] = {"zoo": {"task_id": zoo_task}, "train": [], "score": []}
    products: dict[str, str] = {}
    for (i, p), (outcome, abl) in zip(plans, results):
        rows[p.name].append(outcome.row)
        for k, v in outcome.ray_stages.items():
            stages[k] += v
        products.update({(f"seed{updates[i].seed}/" if i else "") + k: v for k, v in p.products.items()})
        ablation = ablation or abl
    report = {
        "tasks": {t: mean_over_seeds(r) for t, r in rows.items()},
        "seeds": cfg.seeds,
        "config": json.loads(cfg.model_dump_json()),
        "ray": {**ray_facts(), "stages": stages},
        "products": products,
    }
    if ablation:
        report["ablation"] = ablation
    with run.stage("report", total=None) as stage:
        serve = write_serve_config(updates[0], [p for i, p in plans if i == 0])
        report["serve"] = str(serve)
        report["timings"] = run.timings
        comparisons = {p.name: outcome.comparisons for (i, p), (outcome, _) in zip(plans, results) if i == 0}
        paths = write_report(report, comparisons, out)
        stage.note = f"{paths['md']}, {paths['html'].name}, {serve.name}"
    console.line("\n" + verdict_table(report))
    return report
