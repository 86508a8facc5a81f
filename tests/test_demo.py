"""The demo end to end on a reduced configuration: every stage through Ray, the report a
program can check (with the fight of compat's and the control's snapshot curves), a console a
person can read (Ray's output in the run's log), and a compat adapter with fewer negative flips
than the vanilla update; then several seeds with the masking ablation, and pairs of base seeds."""

import json
from pathlib import Path

import pytest

from muscle_ray import console
from muscle_ray.demo import SCORING, DemoConfig, run_demo
from muscle_ray.report import verdict_table
from muscle_ray.zoo.build import BaseConfig, TaskSizes, ZooConfig

pytestmark = pytest.mark.slow

TASKS = list(SCORING)
MC = next(t for t in TASKS if SCORING[t][0] == "mc_jsonl")  # the multiple-choice task: seeds, ablation, bases
DISCRETE = [t for t in TASKS if SCORING[t][2] in ("acc", "exact")]  # right or wrong: quadrants, NFR_mc
STAGES = {
    "zoo",
    "task adapters",
    "score v1/v2",
    "compat and control adapters",
    "score compat/control",
    "task pipelines",
    "total",
}
ADAPTER_STEPS, COMPAT_STEPS, TEST_ROWS = 60, 40, 160
SNAPSHOT_EVERY = 20  # two points per curve beside v2's
STEPS = (20, 40)
SNAPSHOTS = [f"{c}-s{s:06d}" for c in ("compat", "control") for s in STEPS]
ABLATION_CE_WEIGHT = 0.25  # not the variants' 0.5, so the test sees which rows got it
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
        sizes=TaskSizes(train=800, limit=TEST_ROWS),
    )
    return DemoConfig(
        out=str(out),
        zoo=zoo,
        tasks=TASKS,
        adapter={"optim": {"max_steps": ADAPTER_STEPS}, "run": {"eval_every_steps": 30}},
        compat={"optim": {"max_steps": COMPAT_STEPS, "lr": 2e-3}},
        snapshot_every=SNAPSHOT_EVERY,
        adapter_seeds=[],  # the overlap is measured where the base seeds are (minutes saved here)
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
        assert f"{2 * TEST_ROWS}/{2 * TEST_ROWS} rows" in stage(f"{task}: score v1/v2")
        scored = 2 + len(SNAPSHOTS)  # compat, control and their snapshots in one scoring run
        assert f"{scored * TEST_ROWS}/{scored * TEST_ROWS} rows" in stage(f"{task}: score compat/control")
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
        for curve in ("compat", "control"):
            for step in STEPS:
                snapshot = out / "adapters" / task / curve / "snapshots" / f"step-{step:06d}"
                assert (snapshot / "adapter_config.json").is_file(), snapshot


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
    assert set(scored) == {(t, n) for t in TASKS for n in ("v1", "v2", "compat", "control", *SNAPSHOTS)}
    for s in scored.values():  # scored by Ray Data pool actors
        assert s["rows"] == TEST_ROWS and len(s["actors"]) >= 1, s


def test_every_task_row_carries_the_fight(demo):
    """Compat's and the control's curves from v2 (step 0) through their snapshots, the fight's
    numbers and verdict, the plateau; a continuous metric (ROUGE) has no NFR_mc."""
    out, report, _ = demo
    for task, row in report["tasks"].items():
        fight = row["fight"]
        for curve in ("compat", "control"):
            points = fight["curves"][curve]
            assert [p["step"] for p in points] == [0, *STEPS], (task, curve)
            assert (points[0]["acc"], points[0]["nfr"]) == pytest.approx((row["acc_v2"], row["nfr"])), (task, curve)
        mc = fight["mcnemar"]
        assert mc["b"] + mc["c"] <= mc["n"] <= TEST_ROWS, (task, mc)
        assert fight["verdict"]["verdict"] in {
            "compat better",
            "control better",
            "no significant difference",
            "not comparable",
        }
        assert row["plateau"]["steps"] == COMPAT_STEPS and row["plateau"]["acc_v2"] == pytest.approx(row["acc_v2"])
        assert "flip_overlap" not in row  # adapter_seeds: [] here
        assert (row.get("nfr_mc_control") is None) == (task not in DISCRETE), task
    assert "Fair fight" in (out / "report.md").read_text()


def test_flip_rates_add_up_to_the_accuracy_change(demo):
    """An invariant, not a research outcome: for a 0/1 metric acc_new = acc_v1 - NFR + PFR, for
    v2, compat and the control alike (the paper's Table 7 identity)."""
    _, report, _ = demo
    for task in DISCRETE:
        row = report["tasks"][task]
        for side in ("", "_compat", "_control"):
            acc = row["acc_v2"] if side == "" else row[f"acc{side}"]
            assert row["acc_v1"] - row[f"nfr{side}"] + row[f"pfr{side}"] == pytest.approx(acc), (task, side)


def test_a_second_run_reuses_the_zoo(demo, tmp_path):
    """The zoo is keyed by its config: the same config finds it, a changed one rebuilds."""
    from muscle_ray.zoo.build import build_zoo

    out, _, _ = demo
    cfg = reduced(out).zoo
    lines: list[str] = []
    assert build_zoo(out / "zoo", cfg, log=lines.append) == out / "zoo"
    assert any("reusing" in line for line in lines)


def reuse_first_run(first: Path, root: Path) -> None:
    """The first run's zoo and MC adapters under `root`: the same config and inputs, so the
    update reuses them (minutes of CI saved) and trains only what is new to this run."""
    import shutil

    shutil.copytree(first / "zoo", root / "zoo")
    shutil.copytree(first / "adapters" / MC, root / "adapters" / MC)


@pytest.fixture(scope="module")
def seeds_and_ablation(demo, tmp_path_factory):
    """`--seeds 0,1 --ablation MC` on one task, reusing the first run's zoo (same config key)
    and its seed-0 adapters (same inputs key)."""
    first, _, _ = demo
    out = tmp_path_factory.mktemp("demo-seeds")
    reuse_first_run(first, out)
    weights = out / "zoo" / "v1" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    cfg = reduced(out).model_copy(
        update={
            "tasks": [MC],
            "seeds": [0, 1],
            "ablation_task": MC,
            "ablation_ce_weight": ABLATION_CE_WEIGHT,
        }
    )
    report, lines = run(cfg)
    assert weights.stat().st_mtime_ns == built  # the zoo was reused, not rebuilt
    assert report["products"][f"adapters/{MC}/compat"] == "reused"  # same training inputs: not retrained
    assert report["products"][f"seed1/adapters/{MC}/compat"] == "trained"
    return out, report, lines


def test_several_seeds_report_mean_and_per_seed_values(seeds_and_ablation):
    out, report, _ = seeds_and_ablation
    assert report["seeds"] == [0, 1]
    row = json.loads((out / "report.json").read_text())["tasks"][MC]
    for k in ROW_KEYS - {"metric"}:
        per_seed = row[f"{k}_per_seed"]
        assert len(per_seed) == 2 and row[k] == pytest.approx(sum(per_seed) / 2), k
    # The seed reaches the adapters: the two seeds' task models differ somewhere.
    assert any(row[f"{k}_std"] > 0 for k in ("acc_v1", "acc_v2", "nfr")), row
    for root in (out, out / "seed1"):  # seed 0 is the default layout, later seeds sit beside it
        for name in ("v1", "v2", "compat", "control"):
            assert (root / "adapters" / MC / name / "adapter_config.json").is_file(), (root, name)
    assert "±" in (out / "report.md").read_text()


def test_ablation_trains_and_scores_the_papers_rows(seeds_and_ablation):
    """Table 7's six rows: pure KL for the three masks, CE mixed in at the given weight for the
    `+ce` rows; the `muscle` row is the compat adapter itself (the paper's recipe, trained once)."""
    from muscle_ray.demo import ABLATION

    out, report, lines = seeds_and_ablation
    ab = report["ablation"]
    assert ab["task"] == MC and ab["nfr"] == pytest.approx(report["tasks"][MC]["nfr_per_seed"][0])
    assert list(ab["masks"]) == list(ABLATION) and ab["ce_weight"] == ABLATION_CE_WEIGHT
    assert ab["versions"]["muscle"] == "compat"
    assert ab["masks"]["muscle"]["nfr_compat"] == report["tasks"][MC]["nfr_compat_per_seed"][0]
    for row, (mask, ce) in ABLATION.items():
        folder = out / "adapters" / MC / ab["versions"][row]
        manifest = json.loads((folder / "muscle_manifest.json").read_text())
        weight = ABLATION_CE_WEIGHT if ce else 0.0
        assert (manifest["mask"], manifest["config"]["compat"]["ce_weight"]) == (mask, weight), row
        assert 0 <= ab["masks"][row]["nfr_compat"] <= 1
    assert len({r["nfr_compat"] for r in ab["masks"].values()}) > 1, ab  # the masks change what is learned
    assert any(
        line.startswith(f"{MC}: ablation adapters") and f"{5 * COMPAT_STEPS}/{5 * COMPAT_STEPS} steps" in line
        for line in lines
    ), lines
    assert f"Masking ablation on {MC}" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def base_seed_pairs(demo, tmp_path_factory):
    """`--base-seeds 1:2,2:1 --adapter-seeds 3` on one task: the first pair is the first run's
    zoo and adapters (copied, so reused), the second a zoo of its own; the first seed of each
    pair also trains the task adapters of adapter seed 3."""
    first, _, _ = demo
    out = tmp_path_factory.mktemp("demo-bases")
    reuse_first_run(first, out / "bases-1-2")
    cfg = reduced(out).model_copy(update={"tasks": [MC], "base_seeds": [(1, 2), (2, 1)], "adapter_seeds": [3]})
    report, lines = run(cfg)
    return out, report, lines


def test_pairs_of_base_seeds_pool_the_fight(base_seed_pairs):
    from muscle_ray.zoo.build import ZooConfig

    out, report, _ = base_seed_pairs
    bs = report["base_seeds"]
    assert bs["pairs"] == [[1, 2], [2, 1]]
    rows = bs["tasks"][MC]["rows"]
    assert rows[0]["fight"] == report["tasks"][MC]["fight"]  # the first pair is the report's run
    pooled = bs["tasks"][MC]["pooled_mcnemar"]
    assert pooled["pairs"] == 2 and pooled["b"] == sum(r["fight"]["mcnemar"]["b"] for r in rows)
    assert pooled["c"] == sum(r["fight"]["mcnemar"]["c"] for r in rows) and 0 <= pooled["p"] <= 1
    zoo = ZooConfig.model_validate(json.loads((out / "bases-2-1" / "zoo" / "zoo.json").read_text())["config"])
    assert (zoo.v1.seed, zoo.v2.seed) == (2, 1)
    assert report["products"][f"bases-1-2/adapters/{MC}/v2"] == "reused"  # the first run's
    for pair in ("bases-1-2", "bases-2-1"):
        assert report["products"][f"{pair}/adapters/{MC}/v2-seed3"] == "trained", pair
        assert not (out / pair / "report.json").is_file()  # one report, in the run folder
    for row in rows:
        overlap = row["flip_overlap"]
        assert overlap["seeds"] == 2 and 0 <= overlap["jaccard"] <= 1, overlap
    assert "Over pairs of base seeds" in (out / "report.md").read_text()
