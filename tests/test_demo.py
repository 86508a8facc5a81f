"""The demo end to end on a reduced configuration: every stage through Ray, the report a
program can check, and a compat adapter with fewer negative flips than the vanilla update."""

import json
from pathlib import Path

import pytest

from muscle_ray.demo import SCORING, AdapterRecipe, CompatRecipe, DemoConfig, run_demo
from muscle_ray.zoo.build import BaseConfig, TaskSizes, ZooConfig

pytestmark = pytest.mark.slow

TASKS = list(SCORING)
STAGES = {"zoo", "task adapters", "score v1/v2", "compat and control adapters", "score compat/control",
          "task pipelines", "total"}
ROW_KEYS = {"metric", "acc_v1", "acc_v2", "acc_compat", "acc_control", "nfr", "nfr_compat", "nfr_control",
            "pfr", "pfr_compat"}


def reduced(out: Path) -> DemoConfig:
    """Minutes, not the default's quarter hour: small bases, few items, short schedules."""
    zoo = ZooConfig(v1=BaseConfig(seed=1, steps=250, corpus_docs=3000), v2=BaseConfig(seed=2, steps=300, corpus_docs=4000),
                    sizes=TaskSizes(train=800, val=64, test=160), max_number=15)
    return DemoConfig(out=str(out), zoo=zoo, tasks=TASKS, adapter=AdapterRecipe(steps=80, eval_every=40),
                      compat=CompatRecipe(steps=60, lr=2e-3), threads=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import ray

    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    report = run_demo(reduced(out), log=lines.append)
    ray.shutdown()
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
    assert STAGES <= on_disk["timings"].keys()
    assert all(v >= 0 for v in on_disk["timings"].values())
    md = (out / "report.md").read_text()
    for task in TASKS:
        assert task in md and f"{on_disk['tasks'][task]['acc_v2'] * 100:.2f}" in md
    assert md.strip() in "\n".join(lines)                      # the table was printed
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3           # self-contained plots
    assert any("zoo" in line and "done" in line for line in lines)   # progress per stage


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
    assert stages["zoo"]["task_id"]                            # built inside a Ray task
    trained = {Path(t["adapter"]).relative_to(out / "adapters").as_posix(): t for t in stages["train"]}
    assert set(trained) == {f"{t}/{n}" for t in TASKS for n in ("v1", "v2", "compat", "control")}
    for t in trained.values():                                 # a Ray Train run directory per adapter
        assert Path(t["path"]).is_dir() and Path(t["path"]).is_relative_to(out / "ray"), t
        assert any(Path(t["path"]).glob("checkpoint_*")), t
    scored = {(s["task"], s["version"]): s for s in stages["score"]}
    assert set(scored) == {(t, n) for t in TASKS for n in ("v1", "v2", "compat", "control")}
    for s in scored.values():                                  # scored by Ray Data pool actors
        assert s["rows"] == 160 and len(s["actors"]) >= 1, s


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

    import ray

    first, _, _ = demo
    out = tmp_path_factory.mktemp("demo-seeds")
    shutil.copytree(first / "zoo", out / "zoo")
    weights = out / "zoo" / "v1" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    cfg = reduced(out).model_copy(update={"tasks": ["sum_mc"], "seeds": [0, 1], "ablation_task": "sum_mc"})
    lines: list[str] = []
    report = run_demo(cfg, log=lines.append)
    ray.shutdown()
    assert weights.stat().st_mtime_ns == built     # the zoo was reused, not rebuilt
    return out, report, lines


def test_several_seeds_report_mean_and_per_seed_values(seeds_and_ablation):
    out, report, _ = seeds_and_ablation
    assert report["seeds"] == [0, 1]
    row = json.loads((out / "report.json").read_text())["tasks"]["sum_mc"]
    for k in ROW_KEYS - {"metric"}:
        per_seed = row[f"{k}_per_seed"]
        assert len(per_seed) == 2 and row[k] == pytest.approx(sum(per_seed) / 2), k
        assert row[f"{k}_std"] >= 0
    for root in (out, out / "seed1"):     # seed 0 is the default layout, later seeds sit beside it
        for name in ("v1", "v2", "compat", "control"):
            assert (root / "adapters" / "sum_mc" / name / "adapter_config.json").is_file(), (root, name)
    assert "±" in (out / "report.md").read_text()


def test_ablation_trains_and_scores_every_mask(seeds_and_ablation):
    from muscle_ray.training.losses import MASKS

    out, report, _ = seeds_and_ablation
    ab = report["ablation"]
    assert ab["task"] == "sum_mc" and ab["nfr"] == pytest.approx(report["tasks"]["sum_mc"]["nfr_per_seed"][0])
    assert [m.split("+")[0] for m in ab["masks"]] == list(MASKS)
    for mask, r in ab["masks"].items():
        assert 0 <= r["nfr_compat"] <= 1 and r["d_nfr_c"] == pytest.approx(r["nfr_compat"] - ab["nfr"]), mask
        assert r["d_acc_c"] == pytest.approx(r["d_pfr_c"] - r["d_nfr_c"]), mask   # Δacc = ΔPFR − ΔNFR
    for mask in MASKS:
        manifest = json.loads((out / "adapters" / "sum_mc" / f"ablation-{mask}" / "muscle_manifest.json").read_text())
        assert manifest["mask"] == mask
    assert "Masking ablation on sum_mc" in (out / "report.md").read_text()
