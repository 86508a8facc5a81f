"""The vLLM backend gives the HF backend's log-likelihoods, predictions and greedy outputs.

Run with `make test-vllm` (its own venv with vllm-cpu, which pins its own torch); skipped
where vllm is not installed. The model has head_dim 64, a size vLLM's CPU kernels support.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would take 4

from muscle_ray.models import ModelVersion  # noqa: E402
from muscle_ray.scoring.hf import HFScorer  # noqa: E402
from muscle_ray.scoring.vllm import VLLMScorer  # noqa: E402
from muscle_ray.tasks.base import Instance  # noqa: E402

MC = [
    Instance(
        id="a",
        task="t",
        kind="mc",
        contexts=["The quick brown fox jumps"],
        label=0,
        continuations=[" over the lazy dog.", " a man", " 12 apples"],
        choice_chars=[18, 5, 9],
    ),
    Instance(
        id="b",
        task="t",
        kind="mc",
        contexts=["Question: How many apples are left? Answer: "],
        label=1,
        continuations=["12", "9 apples", "#### 18"],
        choice_chars=[2, 8, 7],
    ),
    Instance(
        id="w",
        task="t",
        kind="mc",
        contexts=["The trophy fits", "The suitcase fits"],
        label=0,
        continuations=[" because it is small."] * 2,
        choice_chars=[6, 8],
    ),
]
GEN = [
    Instance(id="g0", task="t", kind="gen", contexts=["Question: How many apples"], stop=["\n\n"], max_new_tokens=12),
    Instance(id="g1", task="t", kind="gen", contexts=["The quick brown fox"], stop=["e", "o"], max_new_tokens=16),
]


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    from muscle_ray.zoo.llama import LlamaSpec, random_lora_dir, random_model_dir

    root = tmp_path_factory.mktemp("vllm")
    base = random_model_dir(
        root / "base",
        LlamaSpec(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256),
        seed=0,
    )
    return base, random_lora_dir(base, root / "lora", seed=0, r=8)


def check_same(version: ModelVersion):
    v = VLLMScorer(version, enforce_eager=True)
    h = HFScorer(version, batch_size=4)
    for a, b in zip(v.loglikelihoods(MC), h.loglikelihoods(MC)):
        np.testing.assert_allclose(a.logliks, b.logliks, atol=1e-3)
        assert np.argmax(a.logliks) == np.argmax(b.logliks)
    assert [o.text for o in v.generate(GEN)] == [o.text for o in h.generate(GEN)]
    return v


def test_vllm_matches_hf_on_base_model(model64):
    check_same(ModelVersion(str(model64[0])))


def test_vllm_lora_request_matches_hf_peft(model64):
    base, lora = model64
    v = check_same(ModelVersion(str(base), adapter=str(lora), name="compat"))
    assert v.adapter == "compat" and set(v.vllm.lora) == {"compat"}


def test_score_job_with_vllm_backend(model64, tmp_path):
    """`--backend vllm` through the Ray Data actor pool gives the HF backend's predictions."""
    import json

    import ray

    from muscle_ray.results import read_results
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score

    data = tmp_path / "mc.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "context": "The quick brown fox" + " jumps" * i,
                    "choices": ["over the dog", "a man", "12 apples"],
                    "label": i % 3,
                }
            )
            + "\n"
            for i in range(8)
        )
    )
    tables = {}
    try:
        for backend in ("hf", "vllm"):
            (s,) = run_score(
                ScoreConfig(
                    versions=[{"name": backend, "base": str(model64[0])}],
                    task="mc_jsonl",
                    data=str(data),
                    out=str(tmp_path / "out"),
                    backend=backend,
                    shard_size=4,
                )
            )
            tables[backend] = {r["id"]: r for r in read_results(s.out).to_pylist()}
    finally:
        ray.shutdown()
    assert tables["hf"].keys() == tables["vllm"].keys() and len(tables["hf"]) == 8
    for k, r in tables["hf"].items():
        assert r["prediction"] == tables["vllm"][k]["prediction"]
        np.testing.assert_allclose(r["choice_logliks"], tables["vllm"][k]["choice_logliks"], atol=1e-3)


def test_generation_through_ray_data_llm_matches_hf(model64, tmp_path):
    """A generative task on `--backend vllm` runs through Ray Data LLM's processor (engines on
    this machine's CPUs; two LoRA adapters in one engine, each a per-request `model`; the base
    in an engine of its own): the HF backend's texts and scores, a bad row in errors.parquet of
    each version, and a rerun that finds every shard done."""
    import json

    import pyarrow.parquet as pq
    import ray

    from muscle_ray.results import read_results
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score
    from muscle_ray.zoo.llama import random_lora_dir

    data = tmp_path / "gen.jsonl"
    lines = [
        json.dumps({"id": f"g{i}", "prompt": "The quick brown fox" + " jumps" * i, "reference": "x"}) for i in range(9)
    ]
    lines[4] = '{"id": "broken", "prompt": '  # not JSON: a bad row, not a failed run
    data.write_text("\n".join(lines) + "\n")
    base, lora = (str(p) for p in model64)
    other = str(random_lora_dir(base, tmp_path / "lora2", seed=1, r=8))
    versions = [
        {"name": "base", "base": base},
        {"name": "compat", "base": base, "adapter": lora},
        {"name": "control", "base": base, "adapter": other},
    ]
    tables, summaries, logs = {}, {}, []
    try:
        for backend in ("hf", "vllm"):
            cfg = ScoreConfig(
                versions=versions,
                task="gen_jsonl",
                task_options={"max_new_tokens": 8, "stop": ["e"]},
                data=str(data),
                out=str(tmp_path / backend),
                backend=backend,
                shard_size=4,
                workers=1,
                cpus_per_worker=1,
            )
            summaries[backend] = run_score(cfg, log=logs.append)
            tables[backend] = {
                s.version: {r["id"]: r for r in read_results(s.out).to_pylist()} for s in summaries[backend]
            }
        again = run_score(cfg)  # the vllm run's config: every shard is found finished
    finally:
        ray.shutdown()
    assert "[gen_jsonl] compat, control: one pass, one base" in "\n".join(logs)
    for s in summaries["vllm"]:
        assert s.rows == 8 and s.errors == 1 and s.actors == ["ray.data.llm"], s
        (reason,) = pq.read_table(f"{s.out}/errors.parquet").column("reason").to_pylist()
        assert "JSON" in reason, reason
    assert [s.resumed_shards for s in again] == [3, 3, 3] and all(s.scored == 0 for s in again)
    for version, hf in tables["hf"].items():
        vl = tables["vllm"][version]
        assert hf.keys() == vl.keys() and len(hf) == 8
        for k, r in hf.items():
            assert (r["generation"], r["score"], r["n_tokens"]) == (
                vl[k]["generation"],
                vl[k]["score"],
                vl[k]["n_tokens"],
            ), (version, k)
    texts = {v: [t[k]["generation"] for k in sorted(t)] for v, t in tables["vllm"].items()}
    assert len({tuple(t) for t in texts.values()}) == 3, texts  # each version's adapter reached the engine
