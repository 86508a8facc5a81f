"""Where a cluster job reads and writes: MUSCLE_WORKSPACE, pyarrow URIs, and the resources its
actor pools ask for. URIs are exercised with real `file://` URIs through pyarrow.fs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from muscle_ray.config import load_config, validated
from muscle_ray.errors import MuscleError
from muscle_ray.locations import copy_location, uri_exists
from muscle_ray.results import write_atomic
from muscle_ray.scoring.config import ScoreConfig
from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

REPO = Path(__file__).resolve().parents[1]


def _score_cfg(**fields) -> ScoreConfig:
    base = dict(task="gen_jsonl", out="runs/jobs/x", versions=[{"name": "v1", "base": "runs/demo/zoo/v1"}])
    return validated(ScoreConfig, {**base, **fields}, "test")


def test_copy_location_round_trips_a_tree_through_a_file_uri(tmp_path):
    src = tmp_path / "src"
    (src / "v1" / "gen_jsonl").mkdir(parents=True)
    write_atomic(pa.table({"id": ["a"]}), src / "v1" / "gen_jsonl" / "shard-00000.parquet")
    (src / "summary.json").write_text("[]")
    uri = f"file://{tmp_path}/bucket/run"
    assert not uri_exists(uri)
    copy_location(src, uri)
    assert uri_exists(uri) and (tmp_path / "bucket/run/v1/gen_jsonl/shard-00000.parquet").is_file()
    copy_location(f"{uri}/summary.json", tmp_path / "back" / "summary.json")
    assert (tmp_path / "back/summary.json").read_text() == "[]"
    with pytest.raises(MuscleError, match="no such file"):
        copy_location(f"file://{tmp_path}/nothing", tmp_path / "x")


def test_score_config_takes_relative_paths_under_the_workspace(tmp_path):
    cfg, copies = _score_cfg(data="runs/demo/zoo/data/pet_em/test.jsonl").located(str(tmp_path), tmp_path / "st")
    assert cfg.versions[0].base == str(tmp_path / "runs/demo/zoo/v1")
    assert cfg.data == str(tmp_path / "runs/demo/zoo/data/pet_em/test.jsonl")
    assert cfg.out == str(tmp_path / "runs/jobs/x") and copies == []
    same, _ = _score_cfg(data="/abs/test.jsonl").located(None, None)  # no workspace: untouched
    assert (same.versions[0].base, same.data, same.out) == ("runs/demo/zoo/v1", "/abs/test.jsonl", "runs/jobs/x")


def test_score_config_fetches_a_data_uri_and_stages_an_out_uri_with_its_shards(tmp_path):
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "test.jsonl").write_text('{"prompt": "p", "reference": "r"}\n')
    remote_out = tmp_path / "bucket" / "out"
    (remote_out / "v1" / "gen_jsonl").mkdir(parents=True)
    (remote_out / "v1" / "gen_jsonl" / "_run.json").write_text("{}")  # a previous run's state
    staging = tmp_path / "staging"
    cfg, copies = _score_cfg(data=f"file://{tmp_path}/bucket/test.jsonl", out=f"file://{remote_out}").located(
        None, staging
    )
    assert Path(cfg.data).read_text() == '{"prompt": "p", "reference": "r"}\n'
    assert Path(cfg.data).is_relative_to(staging) and Path(cfg.data).name == "test.jsonl"
    assert (Path(cfg.out) / "v1" / "gen_jsonl" / "_run.json").is_file()  # seeded: a rerun resumes
    assert copies == [(cfg.out, f"file://{remote_out}")]
    again, _ = _score_cfg(data=f"file://{tmp_path}/bucket/test.jsonl", out=f"file://{remote_out}").located(
        None, staging
    )
    assert (again.data, again.out) == (cfg.data, cfg.out)  # stable paths: the resume fingerprint holds


def test_score_config_refuses_model_uris_and_uris_without_staging(tmp_path):
    bad = _score_cfg(versions=[{"name": "v1", "base": "s3://bucket/models/v1"}])
    with pytest.raises(MuscleError, match=r"versions\[0\]\.base: s3://bucket/models/v1: model directories"):
        bad.located(None, tmp_path)
    with pytest.raises(MuscleError, match="staging"):
        _score_cfg(out="s3://bucket/out").located(None, None)


def test_train_config_located_fetches_data_stages_out_and_keeps_models_local(tmp_path):
    pairs = tmp_path / "bucket" / "train_pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = load_config(
        CompatTrainConfig,
        REPO / "jobs/configs/train_compat.yaml",
        {"data.path": f"file://{pairs}", "out": "gs://bucket/adapters/compat"},
    )
    local, copies = cfg.located(str(tmp_path / "ws"), tmp_path / "st")
    assert Path(local.data.path).read_text() == pairs.read_text()
    assert local.data.val_path == str(tmp_path / "ws/runs/demo/zoo/data/pet_em/val_pairs.jsonl")
    assert local.compat.old.adapter == str(tmp_path / "ws/runs/demo/adapters/pet_em/v1")
    assert local.run.storage_path == str(tmp_path / "ws/runs/jobs/ray")
    assert copies == [(local.out, "gs://bucket/adapters/compat")] and Path(local.out).is_relative_to(tmp_path / "st")
    with pytest.raises(MuscleError, match="compat.new_adapter"):
        load_config(
            CompatTrainConfig, REPO / "jobs/configs/train_compat.yaml", {"compat.new_adapter": "s3://b/v2"}
        ).located(None, tmp_path)
    remote, _ = load_config(
        AdapterTrainConfig, REPO / "jobs/configs/train_adapter.yaml", {"run.storage_path": "s3://b/ray"}
    ).located(None, tmp_path)
    assert remote.run.storage_path == "s3://b/ray"  # handed to Ray Train as it is


def test_score_job_reports_a_user_error_as_exit_2(tmp_path):
    """The script as `ray job submit` runs it: a one-line error naming the field, exit code 2."""
    import subprocess
    import sys

    cfg = tmp_path / "score.yaml"
    cfg.write_text(
        json.dumps(
            {
                "task": "gen_jsonl",
                "out": "runs/jobs/x",
                "data": "x.jsonl",
                "versions": [{"name": "v1", "base": "s3://bucket/v1"}],
            }
        )
    )
    res = subprocess.run(
        [sys.executable, "jobs/score.py", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("muscle score: error: versions[0].base") and res.stderr.count("\n") == 1


# --- the resources a scoring pool asks Ray for -------------------------------------------------


class _Captured(Exception):
    pass


# a joined cluster of 4 nodes x 2 CPUs, one GPU each
CLUSTER = dict(cpus=8, gpus=4, node_cpus=2, node_memory=16 << 30, nodes=4, joined=True)


def _pool_request(monkeypatch, tmp_path, config: str) -> dict:
    """The map_batches arguments the real scoring job builds for `config`, its unset pool fields
    placed as on CLUSTER (no actor starts)."""
    from muscle_ray.scoring import job
    from muscle_ray.scoring.inputs import Inputs
    from muscle_ray.scoring.placement import Resources, place

    seen = {}

    class FakeDataset:
        def map_batches(self, fn, **kwargs):
            seen.update(kwargs)
            raise _Captured

    monkeypatch.setattr(job, "_read_inputs", lambda files: FakeDataset())
    cfg = load_config(ScoreConfig, REPO / "jobs/configs" / config, {"out": str(tmp_path / config)})
    res = Resources(**CLUSTER) if "gpu" in config else Resources(**{**CLUSTER, "gpus": 0})
    plan = place(cfg, res)
    cfg = cfg.model_copy(
        update=dict(workers=plan.workers, cpus_per_worker=plan.cpus_per_worker, gpus_per_worker=plan.gpus_per_worker)
    )
    with pytest.raises(_Captured):
        job.score_version(cfg, cfg.versions[0], Inputs(tmp_path, 1, cfg.shard_size, {}), str(tmp_path / "d.jsonl"))
    return seen


def test_cpu_pool_autoscales_over_the_cluster_with_fractional_cpus_and_no_gpu(monkeypatch, tmp_path):
    req = _pool_request(monkeypatch, tmp_path, "score.yaml")  # leaves the pool to placement
    assert (req["compute"].min_size, req["compute"].max_size) == (1, 8)  # one actor per CPU, 1..8
    assert req["num_cpus"] == 0.75 and req["num_gpus"] is None  # each node keeps 0.5 CPU for reads


def test_gpu_pool_asks_each_actor_for_a_gpu(monkeypatch, tmp_path):
    req = _pool_request(monkeypatch, tmp_path, "score_gpu.yaml")
    assert (req["compute"].min_size, req["compute"].max_size) == (1, 8)
    assert req["num_gpus"] == 1 and req["num_cpus"] == 1


def test_train_compat_job_script_runs_and_reports_a_user_error_as_exit_2():
    """The script as `ray job submit` runs it (python jobs/train_compat.py, jobs/ on sys.path)."""
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "jobs/train_compat.py",
            "--config",
            "jobs/configs/train_compat.yaml",
            "--set",
            "compat.new_adapter=s3://bucket/v2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "compat.new_adapter: s3://bucket/v2" in res.stderr
