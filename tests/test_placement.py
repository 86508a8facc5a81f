"""The scoring pool's defaults (`scoring/placement.py`) and `backend_options`.

The rule is a pure function of the config and a resources snapshot, tested here without Ray;
one slow test checks that a default `run_score` on a 2-CPU Ray uses both CPUs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from muscle_ray.cli import main
from muscle_ray.cli.options import json_values
from muscle_ray.config import load_config
from muscle_ray.errors import MuscleError
from muscle_ray.scoring.config import ScoreConfig
from muscle_ray.scoring.placement import (
    READ_CPUS,
    Placement,
    Resources,
    actor_bytes,
    place,
    starves_reads,
    weight_elements,
)

GiB = 1 << 30


def cfg(**fields) -> ScoreConfig:
    return ScoreConfig(versions=[{"base": "models/v1"}], task="mc_jsonl", out="o", **fields)


def free_cpus(p: Placement, res: Resources) -> float:
    return res.cpus - p.workers[1] * p.cpus_per_worker


# -- a local Ray -------------------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 64])
def test_local_cpu_pool_is_one_single_threaded_actor_per_cpu_and_leaves_room_for_reads(cpus):
    res = Resources(cpus=cpus)
    p = place(cfg(), res)
    assert p.workers == (cpus, cpus) and p.gpus_per_worker == 0 and p.threads == 1
    assert free_cpus(p, res) >= 2 * READ_CPUS - 1e-9 and not starves_reads(p, res)
    assert free_cpus(p, res) <= max(0.5, 0.05 * cpus) + cpus * 0.01 + 1e-9  # and uses the rest


def test_the_log_line_says_what_and_why():
    p = place(cfg(), Resources(cpus=2))
    assert p.describe() == "pool: 2 actors x 0.75 CPU, 1 thread (auto: 2 CPUs, no GPU)"


def test_model_copies_that_do_not_fit_in_memory_mean_fewer_actors_with_more_threads():
    res = Resources(cpus=16, node_memory=8 * GiB)
    p = place(cfg(), res, actor_bytes=3 * GiB)
    assert p.workers == (2, 2)
    assert p.threads == round(p.cpus_per_worker) >= 7 and not starves_reads(p, res)
    assert place(cfg(), res, actor_bytes=100 * GiB).workers == (1, 1)  # never none


def test_local_gpus_get_one_actor_each_and_vllm_tensor_parallel_gets_its_gpus():
    res = Resources(cpus=32, gpus=4)
    hf = place(cfg(), res)
    assert (hf.workers, hf.gpus_per_worker, hf.cpus_per_worker, hf.threads) == ((4, 4), 1.0, 1.0, 1)
    tp = place(cfg(backend="vllm", backend_options={"tensor_parallel_size": 2}), res)
    assert (tp.workers, tp.gpus_per_worker) == ((2, 2), 2.0)
    assert place(cfg(backend="vllm"), res).gpus_per_worker == 1.0


def test_hf_with_device_map_cpu_stays_off_the_gpus():
    p = place(cfg(backend_options={"device_map": "cpu"}), Resources(cpus=8, gpus=2))
    assert p.gpus_per_worker == 0 and p.workers == (8, 8)


def test_vllm_without_gpus_is_one_engine_with_the_cpus():
    p = place(cfg(backend="vllm"), Resources(cpus=8))
    assert p.workers == (1, 1) and p.gpus_per_worker == 0 and p.threads == 8


# -- a cluster ---------------------------------------------------------------------------------


def test_cluster_pool_autoscales_up_to_what_the_autoscaler_can_add():
    res = Resources(cpus=24, node_cpus=8, nodes=3, joined=True, max_cpus=64)
    p = place(cfg(), res)
    assert p.workers == (1, 64) and p.threads == 1
    assert 8 * p.cpus_per_worker <= 8 - 2 * READ_CPUS  # a full node still leaves room for reads
    assert "autoscaling" in p.describe() and "autoscaler max 64 CPUs" in p.describe()


def test_cluster_without_autoscaler_grows_to_what_it_has_and_gpu_clusters_to_their_gpus():
    assert place(cfg(), Resources(cpus=4, node_cpus=2, nodes=2)).workers == (1, 4)
    assert place(cfg(), Resources(cpus=2, joined=True)).workers == (1, 2)  # RAY_ADDRESS: one node
    gpu = place(cfg(), Resources(cpus=16, gpus=1, node_cpus=8, nodes=2, max_cpus=64, max_gpus=8))
    assert (gpu.workers, gpu.gpus_per_worker, gpu.cpus_per_worker) == ((1, 8), 1.0, 1.0)


# -- what the user gives wins ------------------------------------------------------------------


def test_explicit_values_win_and_the_rest_is_derived_around_them():
    res = Resources(cpus=16, gpus=2)
    given = place(cfg(workers="3", cpus_per_worker=0.5, gpus_per_worker=0), res)
    assert (given.workers, given.cpus_per_worker, given.gpus_per_worker) == ((3, 3), 0.5, 0)
    assert given.why == "as configured"
    two = Resources(cpus=2)
    w = place(cfg(workers="1,3"), two)  # the pool given: each actor a share of the CPUs
    assert w.workers == (1, 3) and w.cpus_per_worker == 0.5 and not starves_reads(w, two)
    c = place(cfg(cpus_per_worker=1), two)  # the size given: as many as fit beside the reads
    assert c.workers == (1, 1) and c.cpus_per_worker == 1
    assert place(cfg(gpus_per_worker=0), res).gpus_per_worker == 0  # no GPU, though there are two
    assert "auto workers, cpus" in c.describe() or "auto gpus, workers" in c.describe()


def test_a_pool_that_takes_every_cpu_is_flagged():
    res = Resources(cpus=2)
    assert starves_reads(place(cfg(workers="1", cpus_per_worker=1.9), res), res)


# -- the config --------------------------------------------------------------------------------


def test_pool_fields_default_to_auto_and_keep_their_forms(tmp_path):
    c = cfg()
    assert (c.workers, c.cpus_per_worker, c.gpus_per_worker) == (None, None, None)
    assert cfg(workers="auto", cpus_per_worker="auto").workers is None
    assert cfg(workers="2").workers == (2, 2) and cfg(workers=[1, 4]).workers == (1, 4)
    f = tmp_path / "s.yaml"
    f.write_text("task: mc_jsonl\nout: o\nversions: [{base: m}]\nworkers: [1, 2]\ncpus_per_worker: 0.25\n")
    y = load_config(ScoreConfig, f, {})
    assert y.workers == (1, 2) and y.cpus_per_worker == 0.25 and y.gpus_per_worker is None
    for bad in ("0", "3,1", "a,b"):
        with pytest.raises(ValueError, match="workers"):
            cfg(workers=bad)


def test_backend_options_are_checked_per_backend():
    assert cfg(backend_options={"dtype": "bfloat16", "attn_implementation": "eager"}).backend_options == {
        "dtype": "bfloat16",
        "attn_implementation": "eager",
    }
    with pytest.raises(ValueError, match=r"'tensor_parallel_size' is not an option of the hf backend"):
        cfg(backend_options={"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match=r"'device_map' is not an option of the vllm backend"):
        cfg(backend="vllm", backend_options={"device_map": "auto"})
    with pytest.raises(ValueError, match=r"backend_options.dtype \(hf backend\)"):
        cfg(backend_options={"dtype": "float8"})
    with pytest.raises(ValueError, match="flash"):  # packing needs the 4D mask flash attention ignores
        cfg(backend_options={"attn_implementation": "flash_attention_2"})
    with pytest.raises(ValueError, match=r"backend_options.gpu_memory_utilization"):
        cfg(backend="vllm", backend_options={"gpu_memory_utilization": 1.5})
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs 2 GPUs"):
        cfg(backend="vllm", backend_options={"tensor_parallel_size": 2}, gpus_per_worker=1)


def test_backend_option_flag_reads_json_values(tmp_path, capsys):
    assert json_values(
        ["tensor_parallel_size=2", "enforce_eager=true", "dtype=bfloat16", 'device_map={"": 0}'], "f"
    ) == {
        "tensor_parallel_size": 2,
        "enforce_eager": True,
        "dtype": "bfloat16",
        "device_map": {"": 0},
    }
    with pytest.raises(MuscleError, match="expected KEY=VALUE"):
        json_values(["dtype"], "--backend-option")
    import argparse

    from muscle_ray.cli.score import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", "m", "--task", "mc_jsonl", "--out", "o", "--backend", "vllm"]
    argv += ["--backend-option", "tensor_parallel_size=2", "--cpus-per-worker", "auto", "--gpus-per-worker", "2"]
    c = config_from_args(parser.parse_args(argv))
    assert c.backend_options == {"tensor_parallel_size": 2} and c.cpus_per_worker is None and c.gpus_per_worker == 2
    rc = main(["score", "--model", "m", "--task", "mc_jsonl", "--out", str(tmp_path), "--backend-option", "tp=2"])
    assert rc == 2 and "'tp' is not an option of the hf backend" in capsys.readouterr().err


# -- the options reach the engine --------------------------------------------------------------


def test_weight_count_and_actor_memory_come_from_the_checkpoint(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    params = sum(p.numel() for p in model.parameters())
    assert weight_elements(str(tiny_model)) == params
    one = ScoreConfig(versions=[{"base": str(tiny_model)}], task="mc_jsonl", out="o")
    half = ScoreConfig(
        versions=[{"base": str(tiny_model)}], task="mc_jsonl", out="o", backend_options={"dtype": "bfloat16"}
    )
    assert actor_bytes(one) - actor_bytes(half) == 2 * params  # type: ignore[operator]


def test_hf_dtype_option_loads_a_bf16_model_and_scores_it(tiny_model):
    from muscle_ray.models import ModelVersion
    from muscle_ray.scoring.backend import VersionGroup
    from muscle_ray.tasks.base import Instance

    mc = [
        Instance(
            id=str(i),
            task="t",
            kind="mc",
            contexts=["The quick brown fox" + " jumps" * i],
            label=0,
            continuations=[" over the lazy dog", " a man", " 12 apples"],
            choice_chars=[18, 6, 10],
        )
        for i in range(4)
    ]
    v = ModelVersion(str(tiny_model))
    fp32 = VersionGroup("hf", [v], 2)
    bf16 = VersionGroup("hf", [v], 2, dtype="bfloat16")  # as the job passes backend_options
    eager = VersionGroup("hf", [v], 2, device_map="cpu", attn_implementation="eager")
    assert next(bf16.scorer.model.parameters()).dtype == torch.bfloat16  # type: ignore[attr-defined]
    assert eager.scorer.model.config._attn_implementation == "eager"  # type: ignore[attr-defined]
    with fp32.using("model") as a, bf16.using("model") as b, eager.using("model") as e:
        ref, low, same = (s.loglikelihoods(mc) for s in (a, b, e))
    for r, lo, s in zip(ref, low, same):
        assert all(math.isfinite(x) for x in lo.logliks) and lo.n_tokens == r.n_tokens
        assert max(abs(x - y) for x, y in zip(r.logliks, lo.logliks)) < 0.1 * max(map(abs, r.logliks))
        assert max(abs(x - y) for x, y in zip(r.logliks, s.logliks)) < 1e-4  # eager == sdpa, with packing


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_uses_every_cpu_of_a_local_ray(tmp_path, ray_session, tiny_model, capsys):
    from muscle_ray.scoring.job import run_score

    data = tmp_path / "mc.jsonl"
    rows = [
        {"id": f"q{i}", "context": "The fox" + " jumps" * (i % 5), "label": i % 2, "choices": ["a", "b"]}
        for i in range(48)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "o")  # shards of 8 rows: the pool gets several blocks to share
    c = ScoreConfig(versions=[{"base": str(tiny_model)}], task="mc_jsonl", data=str(data), out=out, batch_size=2)
    (s,) = run_score(c)
    assert "pool: 2 actors x 0.75 CPU, 1 thread (auto: 2 CPUs, no GPU)" in capsys.readouterr().out
    # which actors get the pieces depends on when each finishes loading (under load one may do
    # all 48 rows); bench/bench_score_e2e.py reports both actors used on a real model
    assert s.rows == 48 and 1 <= len(s.actors) <= 2
    assert json.loads((Path(c.out) / "summary.json").read_text())[0]["actors"] == s.actors
