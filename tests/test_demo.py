"""The demo end to end on a reduced configuration: every stage through Ray, the report a
program can check, a console a person can read (Ray's output in the run's log), and a compat
adapter with fewer negative flips than the vanilla update."""

import json
from pathlib import Path

import pytest

from muscle_ray import console
from muscle_ray.demo import SCORING, DemoConfig, run_demo
from muscle_ray.report import verdict_table
from muscle_ray.zoo.build import BaseConfig, TaskSizes, ZooConfig

pytestmark = pytest.mark.slow

TASKS = list(SCORING)
STAGES = {
    "zoo",
    "task adapters",
    "score v1/v2",
    "compat and control adapters",
    "score compat/control",
    "task pipelines",
    "total",
}
ADAPTER_STEPS, COMPAT_STEPS, TEST_ROWS = 80, 60, 160
ABLATION_CE_WEIGHT = 0.25  # not the recipe's 0.5, so the test sees which masks got it
ROW_KEYS = {
    "metric",
    "acc_v1",
    "acc_v2",
    "acc_compat",
    "acc_control",
    "nfr",
    "nfr_compat",
    "nfr_control",
    "pfr",
    "pfr_compat",
}


def reduced(out: Path) -> DemoConfig:
    """Minutes, not the default's quarter hour: small bases, few items, short schedules."""
    zoo = ZooConfig(
        v1=BaseConfig(seed=1, steps=250, corpus_docs=3000),
        v2=BaseConfig(seed=2, steps=300, corpus_docs=4000),
        sizes=TaskSizes(train=800, val=64, test=TEST_ROWS),
        max_number=15,
    )
    return DemoConfig(
        out=str(out),
        zoo=zoo,
        tasks=TASKS,
        adapter={"optim": {"max_steps": ADAPTER_STEPS}, "run": {"eval_every_steps": 40}},
        compat={"optim": {"max_steps": COMPAT_STEPS, "lr": 2e-3}},
        threads=1,
    )


def run(cfg: DemoConfig) -> tuple[dict, list[str]]:
    """As `muscle demo` runs it: the console set up on the run folder (Ray shut down after)."""
    with console.setup(cfg.out) as con:
        report = run_demo(cfg, con)
    return report, con.lines


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report, lines = run(reduced(out))
    return out, report, lines


def test_report_holds_every_number_of_the_table(demo):
    out, report, lines = demo
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tasks"].keys() == set(TASKS)
    for task, row in on_disk["tasks"].items():
        assert ROW_KEYS <= row.keys(), task
        assert row["metric"] == SCORING[task][2]
        for k in ROW_KEYS - {"metric"}:
            assert 0.0 <= row[k] <= 1.0, (task, k, row[k])
    t = on_disk["timings"]
    assert STAGES <= t.keys()
    # Spans, not sums: the pipelines hold every per-task stage, and the run holds zoo + pipelines.
    # (each rounded to 0.1 s)
    assert t["total"] >= t["zoo"] + t["task pipelines"] - 0.2 and t["task pipelines"] > t["zoo"] > 0
    assert t["task pipelines"] >= max(t[s] for s in STAGES - {"zoo", "task pipelines", "total"}) - 0.1
    md = (out / "report.md").read_text()
    for task in TASKS:
        assert task in md and f"{on_disk['tasks'][task]['acc_v2'] * 100:.2f}" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # self-contained plots


def test_the_console_shows_a_line_per_stage_and_the_verdict(demo):
    """What a person sees: a few lines, each stage's count reached (the workers' progress got
    to the driver), the verdict table last; Ray's and the workers' output in the run's log."""
    out, report, lines = demo
    assert len(lines) < 30, "\n".join(lines)
    assert lines[-len(verdict_table(report).splitlines()) :] == verdict_table(report).splitlines()

    def stage(name: str) -> str:
        (line,) = [line for line in lines if line.startswith(name + " ")]  # one line per stage
        return line

    assert "550/550 steps" in stage("zoo")  # both bases, every pretraining step
    for task in TASKS:
        assert f"{2 * ADAPTER_STEPS}/{2 * ADAPTER_STEPS} steps" in stage(f"{task}: task adapters")
        assert f"{2 * COMPAT_STEPS}/{2 * COMPAT_STEPS} steps" in stage(f"{task}: compat and control adapters")
        for scored in ("score v1/v2", "score compat/control"):
            assert f"{2 * TEST_ROWS}/{2 * TEST_ROWS} rows" in stage(f"{task}: {scored}")
    log = (out / "logs" / "ray.log").read_text()
    assert "[muscle-train]" in log and "(RayTrainWorker pid=" in log  # worker output, forwarded by Ray
    assert not any("[muscle-train]" in line or "pid=" in line for line in lines)
    assert (out / "logs" / "ray-session").is_symlink()  # Ray's own logs of this session


def test_products_stay_in_the_output_folder(demo):
    out, _, _ = demo
    for v in ("v1", "v2"):
        assert (out / "zoo" / v / "config.json").is_file() and (out / "zoo" / v / "model.safetensors").is_file()
    for task in TASKS:
        for name in ("v1", "v2", "compat", "control"):
            ad = out / "adapters" / task / name
            assert (ad / "adapter_config.json").is_file() and (ad / "muscle_manifest.json").is_file(), ad
            assert any((out / "results" / task / name).rglob("shard-*.parquet")), (task, name)


def test_every_stage_ran_through_ray(demo):
    out, report, _ = demo
    ray_facts = report["ray"]
    assert ray_facts["address"] and ray_facts["cluster_cpus"] >= 1
    stages = ray_facts["stages"]
    assert stages["zoo"]["task_id"]  # built inside a Ray task
    trained = {Path(t["adapter"]).relative_to(out / "adapters").as_posix(): t for t in stages["train"]}
    assert set(trained) == {f"{t}/{n}" for t in TASKS for n in ("v1", "v2", "compat", "control")}
    for t in trained.values():  # a Ray Train run directory per adapter
        assert Path(t["path"]).is_dir() and Path(t["path"]).is_relative_to(out / "ray"), t
        assert any(Path(t["path"]).glob("checkpoint_*")), t
    scored = {(s["task"], s["version"]): s for s in stages["score"]}
    assert set(scored) == {(t, n) for t in TASKS for n in ("v1", "v2", "compat", "control")}
    for s in scored.values():  # scored by Ray Data pool actors
        assert s["rows"] == TEST_ROWS and len(s["actors"]) >= 1, s


def test_compat_has_fewer_negative_flips_than_the_vanilla_update(demo):
    _, report, _ = demo
    for task in ("sum_mc", "sum_em"):
        row = report["tasks"][task]
        assert row["nfr"] > 0, (task, row)
        assert row["nfr_compat"] < row["nfr"], (task, row)


def test_a_second_run_reuses_the_zoo(demo, tmp_path):
    """The zoo is keyed by its config: the same config finds it, a changed one rebuilds."""
    from muscle_ray.zoo.build import build_zoo

    out, _, _ = demo
    cfg = reduced(out).zoo
    lines: list[str] = []
    assert build_zoo(out / "zoo", cfg, log=lines.append) == out / "zoo"
    assert any("reusing" in line for line in lines)


@pytest.fixture(scope="module")
def seeds_and_ablation(demo, tmp_path_factory):
    """`--seeds 0,1 --ablation sum_mc` on one task, reusing the first run's zoo (same config key)."""
    import shutil

    first, _, _ = demo
    out = tmp_path_factory.mktemp("demo-seeds")
    shutil.copytree(first / "zoo", out / "zoo")
    weights = out / "zoo" / "v1" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    cfg = reduced(out).model_copy(
        update={
            "tasks": ["sum_mc"],
            "seeds": [0, 1],
            "ablation_task": "sum_mc",
            "ablation_ce_weight": ABLATION_CE_WEIGHT,
        }
    )
    report, lines = run(cfg)
    assert weights.stat().st_mtime_ns == built  # the zoo was reused, not rebuilt
    return out, report, lines


def test_several_seeds_report_mean_and_per_seed_values(seeds_and_ablation):
    out, report, _ = seeds_and_ablation
    assert report["seeds"] == [0, 1]
    row = json.loads((out / "report.json").read_text())["tasks"]["sum_mc"]
    for k in ROW_KEYS - {"metric"}:
        per_seed = row[f"{k}_per_seed"]
        assert len(per_seed) == 2 and row[k] == pytest.approx(sum(per_seed) / 2), k
    # The seed reaches the adapters: the two seeds' task models differ somewhere.
    assert any(row[f"{k}_std"] > 0 for k in ("acc_v1", "acc_v2", "nfr")), row
    for root in (out, out / "seed1"):  # seed 0 is the default layout, later seeds sit beside it
        for name in ("v1", "v2", "compat", "control"):
            assert (root / "adapters" / "sum_mc" / name / "adapter_config.json").is_file(), (root, name)
    assert "±" in (out / "report.md").read_text()


def test_ablation_trains_and_scores_every_mask(seeds_and_ablation):
    from muscle_ray.recipes import load
    from muscle_ray.training.losses import MASKS

    out, report, lines = seeds_and_ablation
    ab = report["ablation"]
    assert ab["task"] == "sum_mc" and ab["nfr"] == pytest.approx(report["tasks"]["sum_mc"]["nfr_per_seed"][0])
    recipe_weight = load("compat")["compat"]["ce_weight"]
    for mask in MASKS:
        weight = ABLATION_CE_WEIGHT if mask.endswith("likelihood") else recipe_weight
        manifest = json.loads((out / "adapters" / "sum_mc" / f"ablation-{mask}" / "muscle_manifest.json").read_text())
        assert (manifest["mask"], manifest["config"]["compat"]["ce_weight"]) == (mask, weight)
        assert manifest["best_metrics"]["step"] == COMPAT_STEPS
        assert 0 <= ab["masks"][f"{mask}+ce{weight:g}"]["nfr_compat"] <= 1
    assert len({r["nfr_compat"] for r in ab["masks"].values()}) > 1, ab  # the masks change what is learned
    assert any(
        line.startswith("sum_mc: ablation adapters") and f"{6 * COMPAT_STEPS}/{6 * COMPAT_STEPS} steps" in line
        for line in lines
    ), lines
    assert "Masking ablation on sum_mc" in (out / "report.md").read_text()
