"""The whole MUSCLE update on one machine, over a synthetic zoo: `muscle update` in miniature.

The demo builds (or reuses) the zoo -- two small Llama bases pretrained from scratch and three
tasks -- writes an UpdateConfig for it and runs the update pipeline of muscle_ray/update.py:
task adapters -> flips -> compat and control (with their snapshot curves) -> the adapters of two
more seeds (do flips recur across adapter seeds?) -> report -> serve.yaml. Only what the demo
adds wraps it: the zoo (built in a Ray task), several seeds (the report's mean and spread),
several pairs of base seeds (a zoo and an update each; the fight's McNemar pooled over them) and
the masking ablation (the paper's Table 7).

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
from muscle_ray.update import TaskOutcome, TaskPlan, UpdateConfig, UpdateRun, check_overrides, train_config
from muscle_ray.zoo.build import ZooConfig

# How each zoo task is scored: the generic tasks over the zoo's JSONL files (task, options, metric).
SCORING = {
    "home_mc": ("mc_jsonl", {}, "acc"),
    "pet_em": ("gen_jsonl", {"metric": "exact", "stop": ["."], "max_new_tokens": 4}, "exact"),
    "trip_rouge": ("gen_jsonl", {"metric": "rouge1", "stop": ["."], "max_new_tokens": 24}, "rouge1"),
}


# The paper's Table 7 (its section 6.5): row -> (mask, CE mixed in). The paper's masks are pure
# L_mcomp but for the `CE +` rows, whose weight λ (Eq. 5) it leaves unstated: those take
# `ablation_ce_weight`. (The `new` mask, KL to v2 only, is self-distillation: not a Table 7 row.)
ABLATION: dict[str, tuple[str, bool]] = {
    "muscle": ("muscle", False),
    "old_correct": ("old_correct", False),
    "old": ("old", False),
    "muscle+ce": ("muscle", True),
    "token_likelihood+ce": ("token_likelihood", True),
    "sequence_likelihood+ce": ("sequence_likelihood", True),
}


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = "runs/demo"
    zoo: ZooConfig = ZooConfig()
    tasks: list[str] = list(SCORING)
    seeds: list[int] = [0]  # every adapter's seed: a whole update per seed (the report's mean and spread)
    # More v1/v2 task adapters in the first seed's update: do its negative flips recur across seeds?
    adapter_seeds: list[int] = [1]
    # (v1 seed, v2 seed) pairs of the zoo's bases: a zoo and an update each, under bases-A-B/; the
    # report's rows are the first pair's, and the fight's McNemar is pooled over all. None: the zoo's own.
    base_seeds: list[tuple[int, int]] = []
    # Fields over the recipes, in TrainConfig's shape, e.g. {"optim": {"max_steps": 80}};
    # `compat` also makes the control (the same with compat.mask: ce).
    adapter: dict[str, Any] = {}
    compat: dict[str, Any] = {}
    # As in UpdateConfig: compat/control snapshots, selection for compatibility, compat variants.
    snapshot_every: int | None = Field(None, ge=0)
    select: Literal["loss", "compat"] = "loss"
    select_floor: float = Field(0.0, ge=0)
    variants: list[str] = []
    ablation_task: str | None = None  # train Table 7's masks on this task (ABLATION)
    ablation_ce_weight: float = Field(0.5, ge=0, le=1)  # λ of the `+ce` rows: the paper leaves it unstated
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

    @field_validator("base_seeds")
    @classmethod
    def _distinct_pairs(cls, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if len(set(pairs)) < len(pairs):
            raise ValueError(f"a pair of base seeds given twice in {[f'{a}:{b}' for a, b in pairs]}")
        return pairs

    def train_config(self, kind: Literal["adapter", "compat"], run: dict):
        """The recipe, this config's overrides of it, then one run's paths, seed and name."""
        return train_config(kind, self.adapter, self.compat, run, "demo config")

    def check(self) -> None:
        """Fail on a bad override or option before any work starts (before the zoo is built)."""
        check_overrides(self.adapter, self.compat, "demo config")
        out = Path(self.out)
        self.update_config(out / "zoo", self.seeds[0], out, first=True)

    def zoo_for(self, pair: tuple[int, int] | None) -> ZooConfig:
        """The zoo of a pair of base seeds (None: the zoo as configured)."""
        if pair is None:
            return self.zoo
        v1, v2 = (base.model_copy(update={"seed": seed}) for base, seed in zip((self.zoo.v1, self.zoo.v2), pair))
        return self.zoo.model_copy(update={"v1": v1, "v2": v2})

    def update_config(self, zoo: Path, seed: int, out: Path, first: bool) -> UpdateConfig:
        """The update the demo runs for one seed: the zoo's bases and tasks (the `first` seed's
        also trains the adapter seeds)."""
        from muscle_ray.config import validated

        tasks = [
            {
                "name": t,
                "task": SCORING[t][0],
                "task_options": SCORING[t][1],
                "data": str(zoo / "data" / t / "test.jsonl"),
                "val_data": str(zoo / "data" / t / "val.jsonl"),
                "train": {
                    "path": str(zoo / "data" / t / "train_pairs.jsonl"),
                    "val_path": str(zoo / "data" / t / "val_pairs.jsonl"),
                },
            }
            for t in self.tasks
        ]
        raw = dict(
            out=str(out),
            old=str(zoo / "v1"),
            new=str(zoo / "v2"),
            tasks=tasks,
            adapter=self.adapter,
            compat=self.compat,
            control=True,
            seed=seed,
            snapshot_every=self.snapshot_every,
            select=self.select,
            select_floor=self.select_floor,
            adapter_seeds=self.adapter_seeds if first else [],
            variants=self.variants,
            # pinned, not sized to the machine: the demo's three tasks score side by side while
            # other tasks train, so each gets one small actor (a machine-wide pool would queue them)
            scoring={"batch_size": self.score_batch_size, "workers": 1, "cpus_per_worker": 0.25},
            threads=self.threads,
            concurrent_fits=self.concurrent_fits,
        )
        return validated(UpdateConfig, raw, "demo config")


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
    """Table 7's rows (ABLATION) from the same v2 adapter and steps. A row whose training is
    one the update already did (`muscle` is compat on the paper's recipe) reuses that adapter."""
    from muscle_ray.report import task_row
    from muscle_ray.update import compare_versions, same_training

    versions: dict[str, str] = {}
    for row, (mask, ce) in ABLATION.items():
        name = "ablation-" + row.replace("+", "-")
        a = p.compat_adapter(name, {"compat": {"mask": mask, "ce_weight": ce_weight if ce else 0.0}})
        same = [v for v, b in p.adapters.items() if b.train is not None and same_training(a.train, b.train)]
        versions[row] = same[0] if same else name
        if not same:
            p.adapters[name] = a
    todo = [v for v in versions.values() if v.startswith("ablation-")]
    if todo:
        run.train(p, "ablation adapters", todo, who=p.name)
        run.score(p, "score ablation", todo, who=p.name)
    cmps = compare_versions(p, ["v2", *dict.fromkeys(versions.values())])
    masks = {row: task_row(SCORING[p.name][2], cmps["v2"], cmps[v]) for row, v in versions.items()}
    return {
        "task": p.name,
        "nfr": cmps["v2"].summary["nfr"],
        "ce_weight": ce_weight,
        "versions": versions,
        "masks": masks,
    }


def run_demo(cfg: DemoConfig, console: Console) -> dict:
    """Run the demo, showing its stages on `console`; returns the report (also on disk)."""
    import ray

    from muscle_ray.metrics.fight import pooled_mcnemar
    from muscle_ray.report import mean_over_seeds, verdict_table, write_report
    from muscle_ray.runtime import init_ray
    from muscle_ray.update import plan, ray_facts, write_serve_config
    from muscle_ray.zoo.build import is_built

    cfg.check()
    # Absolute paths: Ray Train workers and pool actors do not run in this process's directory.
    cfg = cfg.model_copy(update={"out": str(Path(cfg.out).resolve())})
    run = UpdateRun(console, cfg.threads, cfg.concurrent_fits)
    out = Path(cfg.out)
    # One zoo and update per pair of base seeds, under bases-A-B/ (without pairs: the run folder).
    pairs: list[tuple[int, int] | None] = list(cfg.base_seeds) or [None]
    roots = [out if pair is None else out / f"bases-{pair[0]}-{pair[1]}" for pair in pairs]
    zoos = [cfg.zoo_for(pair) for pair in pairs]
    console.line(
        f"MUSCLE demo: {', '.join(cfg.tasks)}, seeds {', '.join(map(str, cfg.seeds))}"
        + (f", base seeds {', '.join(f'{a}:{b}' for a, b in cfg.base_seeds)}" if cfg.base_seeds else "")
        + f" -> {out}"
        + (f"  (Ray's output: {console.log_path})" if console.log_path else "")
    )
    init_ray()
    todo = [z for root, z in zip(roots, zoos) if not is_built(root / "zoo", z)]
    with run.stage("zoo", total=sum(z.v1.steps + z.v2.steps for z in todo) or None) as stage:
        if not todo:
            stage.note = "reused " + ", ".join(str(root / "zoo") for root in roots)
        build = ray.remote(num_cpus=0.25)(_build_zoo_task)
        calls = []
        for pair, root, z in zip(pairs, roots, zoos):
            label = "" if pair is None else f" ({pair[0]}:{pair[1]})"
            progress = {v: stage.reporter(f"pretrain {v}{label}") for v in ("v1", "v2")}
            calls.append(build.remote(str(root / "zoo"), z, progress))
        built = ray.get(calls)
    # Per pair, the first seed in its folder (the layout `muscle update` writes), later seeds beside it.
    updates = [
        [
            cfg.update_config(Path(zoo_dir), seed, root if j == 0 else root / f"seed{seed}", first=j == 0)
            for j, seed in enumerate(cfg.seeds)
        ]
        for root, (zoo_dir, _) in zip(roots, built)
    ]

    def suffix(i: int, j: int) -> str:
        """How the console names a task of pair i, seed j (when there are several)."""
        seed = f" seed {cfg.seeds[j]}" if len(cfg.seeds) > 1 else ""
        return seed + (" bases {}:{}".format(*cfg.base_seeds[i]) if len(cfg.base_seeds) > 1 else "")

    plans = [(i, j, p) for i, us in enumerate(updates) for j, u in enumerate(us) for p in plan(u, suffix(i, j))]
    ablate = cfg.ablation_ce_weight
    with run.span("task pipelines"):
        results = run.parallel(
            [
                partial(_pipeline, run, p, ablate if (i, j) == (0, 0) and p.name == cfg.ablation_task else None)
                for i, j, p in plans
            ]
        )
    rows: dict[tuple[int, str], list[dict]] = {(i, t): [] for i in range(len(pairs)) for t in cfg.tasks}
    ablation: dict = {}
    stages: dict[str, Any] = {
        "zoo": {"task_id": built[0][1], "task_ids": [t for _, t in built]},
        "train": [],
        "score": [],
    }
    products: dict[str, str] = {}
    for (i, j, p), (outcome, abl) in zip(plans, results):
        rows[i, p.name].append(outcome.row)
        for k, v in outcome.ray_stages.items():
            stages[k] += v
        where = Path(updates[i][j].out).relative_to(out).as_posix()
        products.update({("" if where == "." else where + "/") + k: v for k, v in p.products.items()})
        ablation = ablation or abl
    report = {
        "tasks": {t: mean_over_seeds(rows[0, t]) for t in cfg.tasks},
        "seeds": cfg.seeds,
        "config": json.loads(cfg.model_dump_json()),
        "ray": {**ray_facts(), "stages": stages},
        "products": products,
    }
    if cfg.base_seeds:  # each pair's first-seed row, and the fight's McNemar pooled over the pairs
        per_pair = {t: [rows[i, t][0] for i in range(len(pairs))] for t in cfg.tasks}
        report["base_seeds"] = {
            "pairs": [list(pair) for pair in cfg.base_seeds],
            "tasks": {
                t: {
                    "rows": r,
                    "pooled_mcnemar": pooled_mcnemar([x["fight"]["mcnemar"] for x in r])
                    if all(x.get("fight") for x in r)
                    else None,
                }
                for t, r in per_pair.items()
            },
        }
    if ablation:
        report["ablation"] = ablation
    with run.stage("report", total=None) as stage:
        serve = write_serve_config(updates[0][0], [p for i, j, p in plans if (i, j) == (0, 0)])
        report["serve"] = str(serve)
        report["timings"] = run.timings
        comparisons = {p.name: o.comparisons for (i, j, p), (o, _) in zip(plans, results) if (i, j) == (0, 0)}
        paths = write_report(report, comparisons, out)
        stage.note = f"{paths['md']}, {paths['html'].name}, {serve.name}"
    console.line("\n" + verdict_table(report))
    return report
