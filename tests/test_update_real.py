"""`muscle update` on a real model, end to end on CPU (slow): SmolLM2-135M-Instruct named by its
.gguf file as v1 and v2 (v2's task adapter another seed), ARC-Easy read through the chat
template, tiny budgets. The report holds the task's row, serve.yaml is what `muscle serve` reads,
and a rerun reuses every adapter and result set."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from muscle_ray import console
from muscle_ray.config import validated
from muscle_ray.update import UpdateConfig, run_update

pytestmark = pytest.mark.slow

EVAL_ROWS, TRAIN_ROWS = 32, 64
VERSIONS = ("v1", "v2", "compat", "control")


def arc_split(shared_data: Path, tmp: Path) -> tuple[Path, Path]:
    """Eval and training files from the release's test file (../shared/data has no ARC-Easy
    train file): the first rows to score, rows far from them to train on."""
    lines = (shared_data / "arc_easy" / "arc_easy_test.llmfoundry.jsonl").read_text().splitlines()
    eval_, train = tmp / "eval.jsonl", tmp / "train.jsonl"
    eval_.write_text("\n".join(lines[:EVAL_ROWS]) + "\n")
    train.write_text("\n".join(islice(lines, 1000, 1000 + TRAIN_ROWS)) + "\n")
    return eval_, train


def run(cfg: UpdateConfig) -> tuple[dict, list[str]]:
    with console.setup(cfg.out) as con:
        report = run_update(cfg, con)
    return report, con.lines


@pytest.fixture(scope="module")
def update(tmp_path_factory, smollm2_gguf, shared_data):
    tmp = tmp_path_factory.mktemp("update_real")
    eval_, train = arc_split(shared_data, tmp)
    cfg = validated(
        UpdateConfig,
        {
            "out": str(tmp / "run"),
            "old": str(smollm2_gguf),
            "new": str(smollm2_gguf),
            "new_seed": 1,
            "tasks": [
                {"task": "arc_easy", "name": "arc", "data": str(eval_), "train": str(train), "chat_template": True}
            ],
            "adapter": {
                "data": {"max_length": 128},
                "lora": {"r": 4, "alpha": 8},
                "optim": {"max_steps": 3, "micro_batch_size": 4, "warmup_steps": 0, "lr": 2e-3},
            },
            "compat": {"optim": {"max_steps": 2, "micro_batch_size": 4}},
            "snapshot_every": 0,  # no snapshot curves: test_update.py has them; a 135M model scores slowly
            "scoring": {"batch_size": 8, "limit": EVAL_ROWS, "workers": 2},  # two actors: both cores
        },
    )
    first, first_lines = run(cfg)
    again, again_lines = run(cfg)
    return Path(cfg.out), first, again, again_lines


def test_the_report_holds_the_tasks_row(update):
    out, first, _, _ = update
    row = json.loads((out / "report.json").read_text())["tasks"]["arc"]
    assert row["metric"] == "acc"
    for k in ("acc_v1", "acc_v2", "acc_compat", "acc_control", "nfr", "nfr_compat", "nfr_control"):
        assert 0 <= row[k] <= 1, (k, row)
    assert first["products"] == {
        **{f"adapters/arc/{v}": "trained" for v in VERSIONS},
        **{f"results/arc/{v}": f"scored {EVAL_ROWS}" for v in VERSIONS},
    }
    manifest = json.loads((out / "adapters" / "arc" / "v1" / "muscle_manifest.json").read_text())
    assert manifest["config"]["data"]["chat_template"] is True and manifest["config"]["lora"]["r"] == 4


def test_serve_yaml_is_what_muscle_serve_reads(update, smollm2_dir):
    from muscle_ray.serving.app import build
    from muscle_ray.serving.config import read_serve_file

    out, _, _, _ = update
    cfg, options = read_serve_file(out / "serve.yaml")
    assert cfg.bases["v1"].path == str(smollm2_dir)  # the .gguf named in the config, as converted
    assert cfg.base_of() == {"arc-old": "v1", "arc-new": "v2", "arc-compat": "v2", "arc-control": "v2"}
    assert build(cfg, deployments=options["deployments"]) is not None


def test_a_rerun_skips_every_stage(update):
    out, first, again, lines = update
    assert set(again["products"].values()) == {"reused"} and again["products"].keys() == first["products"].keys()
    for stage in ("task adapters", "compat and control adapters", "score v1/v2", "score compat/control"):
        (line,) = [line for line in lines if line.startswith(f"arc: {stage} ")]
        assert "reused" in line, line
    assert again["tasks"]["arc"] == first["tasks"]["arc"]
    assert again["timings"]["task pipelines"] < first["timings"]["task pipelines"] / 3, (
        again["timings"],
        first["timings"],
    )
    log = (out / "logs" / "ray.log").read_text()
    assert log.count("Ray Train run arc-") == len(VERSIONS)  # every fit is in the first run
