"""`muscle update`: the config a user writes (checked before any work, one error line), the
inputs keys that decide what a rerun redoes, the serving config it writes, and (slow) the whole
pipeline on two tiny bases, with every option of the fair fight on (snapshot curves, selection on
validation data, extra adapter seeds, variants): a first run, a rerun that reuses everything, and
a changed compat recipe that retrains and rescores what descends from compat and control only."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

from muscle_ray.cli import main
from muscle_ray.config import load_config, validated
from muscle_ray.errors import MuscleError
from muscle_ray.update import UpdateConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the example names hub ids: the cache only, no network


def sums(path: Path, n: int, seed: int, kind: str) -> Path:
    """Tiny arithmetic items: mc_jsonl questions, or prompt/completion training pairs."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            x, y = rng.randint(1, 9), rng.randint(1, 9)
            prompt = f"ann has {x} figs. bob has {y} figs. figs in all?"
            if kind == "mc":
                choices = [f" {x + y}.", f" {x + y + 1}.", f" {abs(x - y)}."]
                f.write(json.dumps({"id": f"q{i}", "context": prompt, "choices": choices, "label": 0}) + "\n")
            else:
                f.write(json.dumps({"prompt": prompt, "completion": f" {x + y}."}) + "\n")
    return path


def tiny_update(tmp: Path, old: Path, new: Path, **over) -> dict:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    raw = {
        "out": str(tmp / "run"),
        "old": str(old),
        "new": str(new),
        "tasks": [
            {
                "task": "mc_jsonl",
                "name": "figs",
                "data": str(sums(data / "test.jsonl", 24, 1, "mc")),
                "val_data": str(sums(data / "val_mc.jsonl", 16, 4, "mc")),
                "train": {
                    "path": str(sums(data / "train.jsonl", 64, 2, "pairs")),
                    "val_path": str(sums(data / "val.jsonl", 16, 3, "pairs")),
                },
            }
        ],
        "adapter": {
            "data": {"max_length": 40},
            "lora": {"r": 4, "alpha": 8},
            "optim": {"max_steps": 4, "micro_batch_size": 8, "warmup_steps": 0},
        },
        "compat": {"optim": {"max_steps": 3}},
        "new_seed": 1,
        "scoring": {"batch_size": 8},
    }
    return {**raw, **over}


# --- the config --------------------------------------------------------------------------------


def test_the_example_config_validates():
    cfg = load_config(UpdateConfig, REPO / "jobs" / "configs" / "update.yaml")
    (task,) = cfg.tasks
    assert (task.name, task.chat_template, cfg.control) == ("arc_easy", True, True)
    assert task.training_data() == {"task": "arc_easy", "task_options": {}, "chat_template": True, "data_root": "data"}
    text = (REPO / "jobs" / "configs" / "update.yaml").read_text()
    assert len(text.splitlines()) <= 20  # short enough to copy
    assert text in (REPO / "README.md").read_text()  # README shows this file, as it is


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": [{"task": "mc_jsonl", "data": "t.jsonl"}]}, "field 'tasks[0].train': Field required"),
        ({"tasks": [{"task": "nope", "data": "t.jsonl", "train": "t.jsonl"}]}, "unknown task 'nope'"),
        ({"tasks": [{"task": "mc_jsonl", "train": "t.jsonl"}]}, "task mc_jsonl: give data (its eval file)"),
        ({"tasks": [{"task": "mc_jsonl", "data": "a", "train": "a"}] * 2}, "two tasks named mc_jsonl"),
        ({"tasks": [{"task": "mc_jsonl", "name": "a b", "data": "a", "train": "a"}]}, "name 'a b'"),
        ({"scoring": {"workers": "3,1"}}, "field 'scoring.workers': need 1 <= MIN <= MAX, got 3,1"),
        ({"adapter": {"optim": {"lrr": 1}}}, "adapter (over muscle_ray/recipes/task_adapter.yaml): field 'optim.lrr'"),
        (
            {"select": "compat"},
            "select: compat scores compat's snapshots on validation data (never on the test set): "
            "give val_data for task mc_jsonl",
        ),
        (
            {
                "select": "compat",
                "snapshot_every": 0,
                "tasks": [{"task": "mc_jsonl", "data": "a", "train": "a", "val_data": "v"}],
            },
            "select: compat picks one of compat's snapshots, but snapshot_every is 0",
        ),
        (
            {"variants": ["muscle+ce", "nope"]},
            "field 'variants': unknown variant 'nope'; known: muscle+ce, answer_only",
        ),
        ({"adapter_seeds": [3, 0]}, "adapter_seeds [3, 0]: each must differ from the others and from seed 0"),
        (
            {"adapter_seeds": [3], "tasks": [{"task": "mc_jsonl", "data": "a", "train": "a", "old_adapter": "x"}]},
            "task mc_jsonl gives its own (old_adapter/new_adapter)",
        ),
        ({"compat": {"optim": {"max_steps": None}}}, "snapshot_every: compat.optim.max_steps is not set"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_field(change, message):
    raw = {"old": "models/v1", "new": "models/v2", "tasks": [{"task": "mc_jsonl", "data": "a", "train": "a"}], **change}
    with pytest.raises(MuscleError) as e:
        validated(UpdateConfig, raw, "update.yaml")
    assert str(e.value).startswith("update.yaml: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_recipe_override_fails_before_any_work(tmp_path, capsys, tiny_model, tiny_model_b):
    path = tmp_path / "update.yaml"
    path.write_text(yaml.safe_dump(tiny_update(tmp_path, tiny_model, tiny_model_b)))
    assert main(["update", "--config", str(path), "--set", "adapter.optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"muscle update: error: {path}: adapter (over muscle_ray/recipes/task_adapter.yaml): field 'optim.lr'"
        )
        and err.count("\n") == 1
    ), err
    assert not (tmp_path / "run").exists()


def test_snapshots_default_to_five_points_per_curve(tmp_path, tiny_model, tiny_model_b):
    """compat and control export a snapshot every fifth of compat's steps (their curves); the
    task adapters and the variants do not; 0 turns them off."""
    from muscle_ray.recipes import load
    from muscle_ray.update import plan

    def every(**over):
        cfg = validated(UpdateConfig, tiny_update(tmp_path, tiny_model, tiny_model_b, **over))
        (p,) = plan(cfg)
        return cfg.snapshot_steps(), {v: a.train.run.snapshot_every_steps for v, a in p.adapters.items()}

    recipe_steps = load("compat")["optim"]["max_steps"]
    steps, runs = every(compat={}, variants=["answer_only"])
    assert steps == recipe_steps // 5
    assert runs == {"v1": None, "v2": None, "compat": steps, "control": steps, "variant-answer_only": None}
    assert every(compat={"optim": {"max_steps": 3}})[0] == 1  # never 0 steps apart
    assert every(snapshot_every=7)[0] == 7
    assert every(snapshot_every=0) == (None, {v: None for v in ("v1", "v2", "compat", "control")})


def test_variants_and_seeds_are_adapters_of_their_own(tmp_path, tiny_model, tiny_model_b):
    """A variant is compat with its overrides on top of the config's; an adapter seed trains a
    v1 and a v2 task adapter with that seed."""
    from muscle_ray.update import VARIANTS, plan

    raw = tiny_update(tmp_path, tiny_model, tiny_model_b, variants=list(VARIANTS), adapter_seeds=[7])
    (p,) = plan(validated(UpdateConfig, raw))
    compat, ce, answer = (p.adapters[v].train for v in ("compat", "variant-muscle-ce", "variant-answer_only"))
    assert (compat.compat.ce_weight, compat.data.loss_on) == (0.0, "all")  # the paper's recipe
    assert (ce.compat.ce_weight, ce.data.loss_on) == (0.5, "all")
    assert (answer.compat.ce_weight, answer.data.loss_on) == (0.0, "completion")
    assert ce.optim.max_steps == answer.optim.max_steps == compat.optim.max_steps == 3  # the config's compat
    v1, v2 = p.adapters["v1-seed7"], p.adapters["v2-seed7"]
    assert (v1.train.run.seed, v2.train.run.seed) == (7, 7)
    assert (v1.base, v2.base) == (str(tiny_model), str(tiny_model_b))


def test_training_data_forms(tmp_path):
    def data(train):
        task = {"task": "arc_easy", "data": "x", "train": train, "chat_template": True}
        raw = {"old": "a", "new": "b", "tasks": [task]}
        return validated(UpdateConfig, raw).tasks[0].training_data()

    own = {"task": "arc_easy", "task_options": {}, "chat_template": True}
    assert data("train.jsonl") == {**own, "path": "train.jsonl"}  # the task's own rows
    assert data({"data_root": "d"}) == {**own, "data_root": "d"}  # its training split there
    assert data({"path": "p.jsonl", "val_path": "v.jsonl"}) == {
        "chat_template": True,
        "path": "p.jsonl",
        "val_path": "v.jsonl",
    }  # prompt/completion rows


def test_inputs_keys_follow_content_not_paths(tmp_path, tiny_model, tiny_model_b):
    """The key an adapter is reused by: the same config and content in another run folder, or
    the same base or data in another place, keeps it; a changed recipe field, training file or
    base changes it."""
    from muscle_ray.update import plan, training_key

    def key(**over):
        cfg = validated(UpdateConfig, tiny_update(tmp_path, tiny_model, tiny_model_b, **over))
        (p,) = plan(cfg)
        return training_key(p.adapters["v1"].train), training_key(p.adapters["v2"].train)

    v1, v2 = key()
    assert v1 != v2  # other base, other seed
    assert key(out=str(tmp_path / "elsewhere")) == (v1, v2)
    assert key(adapter={"optim": {"max_steps": 5}}) != (v1, v2)
    assert key(new_seed=0)[0] == v1 and key(new_seed=0)[1] != v2
    base_copy = shutil.copytree(tiny_model, tmp_path / "base-copy")  # the same base in another folder
    (p,) = plan(validated(UpdateConfig, tiny_update(tmp_path, base_copy, tiny_model_b)))
    assert training_key(p.adapters["v1"].train) == v1
    moved = tmp_path / "moved.jsonl"
    shutil.copy(tmp_path / "data" / "train.jsonl", moved)
    raw = tiny_update(tmp_path, tiny_model, tiny_model_b)
    raw["tasks"][0]["train"]["path"] = str(moved)
    (p,) = plan(validated(UpdateConfig, raw))
    assert training_key(p.adapters["v1"].train) == v1  # the same bytes elsewhere
    with open(moved, "a") as f:
        f.write(json.dumps({"prompt": "one more", "completion": " row"}) + "\n")
    assert training_key(p.adapters["v1"].train) != v1


def test_the_serving_config_hosts_every_model_of_every_task(tmp_path, tiny_model, tiny_model_b, tiny_adapter):
    """serve.yaml in the format `muscle serve --config` reads, every model directory checked."""
    from muscle_ray.serving.config import read_serve_file
    from muscle_ray.update import plan, write_serve_config

    raw = tiny_update(tmp_path, tiny_model, tiny_model_b)
    raw["tasks"].append({**raw["tasks"][0], "name": "figs2", "old_adapter": str(tiny_adapter)})
    cfg = validated(UpdateConfig, raw)
    plans = plan(cfg)
    for p in plans:
        for a in p.adapters.values():
            if not a.path.exists():
                shutil.copytree(tiny_adapter, a.path)
    path = write_serve_config(cfg, plans)
    app, options = read_serve_file(path)
    models = app.base_of()
    assert models == {
        "figs-old": "v1",
        "figs2-old": "v1",
        **{f"{t}-{v}": "v2" for t in ("figs", "figs2") for v in ("new", "compat", "control")},
    }
    assert app.bases["v1"].models["figs2-old"] == str(tiny_adapter)  # a given adapter, served as it is
    assert app.bases["v2"].models["figs-compat"] == str(tmp_path / "run" / "adapters" / "figs" / "compat")
    assert (app.compare.old, app.compare.new) == ("figs-old", "figs-new")
    assert set(options["deployments"]) == {"gateway", "model_v1", "model_v2"}
    with pytest.raises(MuscleError, match="figs-control"):  # a model directory gone
        shutil.rmtree(plans[0].adapters["control"].path)
        write_serve_config(cfg, plans)


# --- the whole pipeline (slow) -------------------------------------------------------------------


def _run(config: dict, path: Path, *flags: str) -> dict:
    path.write_text(yaml.safe_dump(config))
    assert main(["update", "--config", str(path), *flags]) == 0
    return json.loads((Path(config["out"]) / "report.json").read_text())


# The fair fight, small: compat and control snapshot at steps 2 and 4, selection on validation
# data (a floor wide enough that a snapshot qualifies on random tiny bases), one more adapter
# seed (an overlap of two seeds: CI minutes), both variants.
FIGHT = {
    "compat": {"optim": {"max_steps": 4}},
    "snapshot_every": 2,
    "select": "compat",
    "select_floor": 0.5,
    "adapter_seeds": [2],
    "variants": ["muscle+ce", "answer_only"],
}
SNAPSHOTS = [f"{c}-s{s:06d}" for c in ("compat", "control") for s in (2, 4)]
SEEDS = [f"{b}-seed{k}" for k in (2,) for b in ("v1", "v2")]
VARIANT_VERSIONS = ["variant-muscle-ce", "variant-answer_only"]
VERSIONS = ("v1", "v2", "compat", "control")
ADAPTERS = [*VERSIONS, *SEEDS, *VARIANT_VERSIONS]
TEST_SCORED = [*ADAPTERS, *SNAPSHOTS, "compat-selected"]
VAL_SCORED = ["v1", "v2", "compat-s000002", "compat-s000004"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_model_b):
    """The same update three times: first, again unchanged, then with another compat lr (and,
    to save two fits, no variants: they descend from compat as the control does)."""
    tmp = tmp_path_factory.mktemp("update")
    config = tiny_update(tmp, tiny_model, tiny_model_b, **FIGHT)
    first = _run(config, tmp / "update.yaml")
    again = _run(config, tmp / "update.yaml")
    changed = _run(config, tmp / "update.yaml", "--set", "compat.optim.lr=5e-4", "--set", "variants=[]")
    return Path(config["out"]), first, again, changed


@pytest.mark.slow
def test_a_first_run_trains_scores_and_reports_every_version(runs):
    out, first, _, _ = runs
    row = first["tasks"]["figs"]
    for k in ("acc_v1", "acc_v2", "acc_compat", "acc_control", "nfr", "nfr_compat", "nfr_control"):
        assert 0 <= row[k] <= 1, k
    assert row["metric"] == "acc"
    step = row["selected"]["step"]
    assert first["products"] == {
        **{f"adapters/figs/{v}": "trained" for v in ADAPTERS},
        "adapters/figs/compat-selected": f"selected step {step}",
        **{f"results/figs/{v}": "scored 24" for v in TEST_SCORED},
        **{f"results/figs/val/{v}": "scored 16" for v in VAL_SCORED},
    }
    for v in ADAPTERS:
        manifest = json.loads((out / "adapters" / "figs" / v / "muscle_manifest.json").read_text())
        assert manifest["inputs_key"] and Path(manifest["ray_run"]["path"]).is_relative_to(out / "ray")
    scored = {(s["version"], s["split"], s["rows"]) for s in first["ray"]["stages"]["score"]}
    assert scored == {(v, "test", 24) for v in TEST_SCORED} | {(v, "val", 16) for v in VAL_SCORED}
    for name in ("report.json", "report.md", "report.html", "serve.yaml", "logs/ray.log"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_the_row_carries_the_fight(runs):
    """Both curves start at v2's numbers and have a point per snapshot; McNemar counts only
    instances v1 gets right; the verdict is one of four."""
    _, first, _, _ = runs
    row = first["tasks"]["figs"]
    fight = row["fight"]
    for curve in ("compat", "control"):
        points = fight["curves"][curve]
        assert [p["step"] for p in points] == [0, 2, 4], curve
        assert (points[0]["acc"], points[0]["nfr"], points[0]["pfr"]) == (row["acc_v2"], row["nfr"], row["pfr"])
        for p in points:
            assert 0 <= p["acc"] <= 1 and 0 <= p["nfr"] <= row["acc_v1"], p
    mc = fight["mcnemar"]
    assert mc["b"] + mc["c"] <= mc["n"] == round(row["acc_v1"] * 24) and 0 <= mc["p"] <= 1
    assert (mc["step_compat"], mc["step_control"]) == (4, 4)
    assert fight["verdict"]["verdict"] in {
        "compat better",
        "control better",
        "no significant difference",
        "not comparable",
    }
    assert fight["matched"]["n_boot"] == 1000
    plateau = row["plateau"]
    assert plateau["steps"] == 4 and plateau["acc_v2"] == row["acc_v2"]
    assert plateau["acc_after"] == fight["curves"]["control"][-1]["acc"]
    for k in ("nfr_mc_control", "both_wrong_diff", "both_wrong_diff_compat", "both_wrong_diff_control"):
        assert 0 <= row[k] <= 1, k


@pytest.mark.slow
def test_flip_overlap_variants_and_selection(runs):
    from muscle_ray.update import adapter_digest

    out, first, _, _ = runs
    row = first["tasks"]["figs"]
    overlap = row["flip_overlap"]
    assert overlap["seeds"] == 2 and len(overlap["nfr"]) == 2 and overlap["nfr"][0] == row["nfr"]
    assert set(row["variants"]) == {"muscle+ce", "answer_only"}
    for name, v in row["variants"].items():
        assert 0 <= v["nfr_compat"] <= 1 and v["acc_v2"] == row["acc_v2"], name
    sel = row["selected"]
    assert sel["step"] in (2, 4) and sel["val_acc"] >= sel["val_acc_v2"] - FIGHT["select_floor"]
    assert sel["loss"]["acc"] == row["acc_compat"] and 0 <= sel["test"]["nfr"] <= 1
    chosen = out / "adapters" / "figs" / "compat-selected"
    manifest = json.loads((chosen / "muscle_manifest.json").read_text())
    assert manifest["selected"]["step"] == sel["step"] and "validation" in manifest["selected"]["why"]
    snapshot = out / "adapters" / "figs" / "compat" / "snapshots" / f"step-{sel['step']:06d}"
    assert adapter_digest(chosen) == adapter_digest(snapshot)
    assert "Selection for compatibility" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_rerun_reuses_every_product(runs):
    out, first, again, _ = runs
    assert set(again["products"].values()) == {"reused"} and again["products"].keys() == first["products"].keys()
    assert again["tasks"]["figs"] == first["tasks"]["figs"]
    assert again["timings"]["task pipelines"] < first["timings"]["task pipelines"] / 2


@pytest.mark.slow
def test_a_changed_compat_recipe_retrains_and_rescores_compat_and_control_only(runs):
    """What descends from the compat recipe is redone (compat, control, their snapshots and
    scores, the selection); the task adapters of every seed and their scores stay."""
    out, first, _, changed = runs
    kept = ("v1", "v2", *SEEDS)
    step = changed["tasks"]["figs"]["selected"]["step"]
    assert changed["products"] == {
        **{f"adapters/figs/{v}": "reused" if v in kept else "trained" for v in ADAPTERS if "variant" not in v},
        "adapters/figs/compat-selected": f"selected step {step}",
        **{f"results/figs/{v}": "reused" if v in kept else "scored 24" for v in TEST_SCORED if "variant" not in v},
        **{f"results/figs/val/{v}": "reused" if v in ("v1", "v2") else "scored 16" for v in VAL_SCORED},
    }
    assert "variants" not in changed["tasks"]["figs"]
    manifest = json.loads((out / "adapters" / "figs" / "compat" / "muscle_manifest.json").read_text())
    assert manifest["config"]["optim"]["lr"] == 5e-4
    row, before = changed["tasks"]["figs"], first["tasks"]["figs"]
    assert (row["acc_v1"], row["acc_v2"], row["nfr"]) == (before["acc_v1"], before["acc_v2"], before["nfr"])
    assert row["flip_overlap"] == before["flip_overlap"]


@pytest.mark.slow
def test_the_serving_app_builds_from_the_runs_serve_yaml(runs):
    from muscle_ray.serving.app import build
    from muscle_ray.serving.config import read_serve_file

    out, _, _, _ = runs
    cfg, options = read_serve_file(out / "serve.yaml")
    app = build(cfg, deployments=options["deployments"])
    assert app is not None and set(cfg.base_of()) == {f"figs-{n}" for n in ("old", "new", "compat", "control")}
