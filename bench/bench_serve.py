"""Benchmark the Serve app: /v1/completions against /v1/compare under concurrent load.

Zoo-shaped models (the demo's architecture, random weights): base v1 with `old`, base v2 with
`new` and `compat`, one replica each (autoscaling off so both endpoints get the same hardware).
Sends N requests at concurrency C for each kind, in alternating rounds so drift hits all
alike, and prints one JSON line: errors, p50/p99 latency (ms) and throughput of each, and
ratios of p50s. Kinds:
  completions            /v1/completions to `new` (the issue's baseline)
  completions_logprobs   the same with per-token logprobs: a model's share of a compare's work
  compare                /v1/compare old vs new (both completions with logprobs, ROUGE-L, agreement)
  sequential             what compare would cost one model after the other: old then new,
                         each a completions_logprobs request, from the same client task
Target: compare p50 <= 1.3x completions p50 (old and new run concurrently on their own
deployments, so a compare costs about one completion, not two). That needs a free core per
deployment: on a 2-core machine shared with other jobs the ratio measures the contention too,
which is why `sequential` is measured alongside (compare / sequential < 1 = the concurrency),
and the same ratios at concurrency 1 (`light`: the app's own load no longer saturates the CPUs).

    .venv/bin/python bench/bench_serve.py [--requests 200] [--concurrency 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

PORT = 18432


def make_models(root: Path) -> dict:
    from transformers import AutoTokenizer

    from muscle_ray.zoo.build import BaseConfig
    from muscle_ray.zoo.llama import random_lora_dir, random_model_dir
    from muscle_ray.zoo.tokenizer import SAMPLE_TEXT, build_tokenizer

    spec = BaseConfig().spec()
    v1 = random_model_dir(root / "v1", spec, seed=0, tokenizer=build_tokenizer(SAMPLE_TEXT, vocab_size=400))
    v2 = random_model_dir(root / "v2", spec, seed=1, tokenizer=AutoTokenizer.from_pretrained(v1))
    return {
        "v1": {"path": str(v1), "models": {"old": str(random_lora_dir(v1, root / "old", seed=0))}},
        "v2": {
            "path": str(v2),
            "models": {
                "new": str(random_lora_dir(v2, root / "new", seed=1)),
                "compat": str(random_lora_dir(v2, root / "compat", seed=2)),
            },
        },
    }


def load(url: str, calls: list[list[tuple[str, dict]]], concurrency: int) -> tuple[list[float], int, float]:
    """(latencies in ms, errors, wall seconds) of running every call with `concurrency` in flight.

    A call is a list of (path, body) POSTed one after the other; its latency is the total.
    """
    import requests

    def one(call: list[tuple[str, dict]]) -> tuple[float, bool]:
        t0, ok = time.perf_counter(), True
        for path, body in call:
            try:
                ok &= requests.post(url + path, json=body, timeout=120).status_code == 200
            except requests.RequestException:
                ok = False
        return (time.perf_counter() - t0) * 1000, ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, calls))
    return [ms for ms, _ in results], sum(not ok for _, ok in results), time.perf_counter() - t0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--light-requests", type=int, default=50, help="requests per kind at concurrency 1")
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16, help="@serve.batch max_batch_size of the model deployments")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from muscle_ray.runtime import init_ray
    from muscle_ray.serving.app import build

    fixed = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    deployments = {
        "gateway": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "model_v1": fixed,
        "model_v2": fixed,
    }
    prompts = [
        f"Tom has {i % 13} apples and gets {i % 7} more. How many apples does Tom have?" for i in range(args.requests)
    ]
    gen = {"max_tokens": args.max_tokens, "stop": ["."], "temperature": 0}
    bodies = {
        "completions": [[("completions", {"model": "new", "prompt": q, **gen})] for q in prompts],
        "completions_logprobs": [
            [("completions", {"model": "new", "prompt": q, "logprobs": 0, **gen})] for q in prompts
        ],
        "compare": [[("compare", {"prompt": q, **gen})] for q in prompts],
        "sequential": [
            [("completions", {"model": m, "prompt": q, "logprobs": 0, **gen}) for m in ("old", "new")] for q in prompts
        ],
    }
    lat: dict[str, list[float]] = {k: [] for k in bodies}
    errors = {k: 0 for k in bodies}
    wall = {k: 0.0 for k in bodies}
    with tempfile.TemporaryDirectory() as tmp:
        bases = make_models(Path(tmp))
        init_ray(num_cpus=2)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": PORT})
            serve.run(
                build(
                    {"bases": bases, "api_key_env": None, "batch": {"max_batch_size": args.batch_size}},
                    deployments=deployments,
                ),
                name="muscle",
                route_prefix="/",
                logging_config={"log_level": "WARNING", "enable_access_log": False},
            )
            url = f"http://127.0.0.1:{PORT}/v1/"
            for kind, b in bodies.items():  # warm-up: first batches, rouge-score's import
                load(url, b[:32], args.concurrency)
            for _ in range(args.rounds):
                for kind, b in bodies.items():
                    ms, err, w = load(url, b, args.concurrency)
                    lat[kind] += ms
                    errors[kind] += err
                    wall[kind] += w
            light = {
                k: float(np.percentile(load(url, b[: args.light_requests], 1)[0], 50))
                for k, b in bodies.items()
                if k in ("completions", "compare", "sequential")
            }
        finally:
            serve.shutdown()
            ray.shutdown()
    out = {"requests_each": args.requests * args.rounds, "concurrency": args.concurrency}
    for kind in bodies:
        out[kind] = {
            "errors": errors[kind],
            "p50_ms": round(float(np.percentile(lat[kind], 50)), 1),
            "p99_ms": round(float(np.percentile(lat[kind], 99)), 1),
            "req_per_s": round(args.requests * args.rounds / wall[kind], 1),
        }
    p50 = {k: out[k]["p50_ms"] for k in bodies}
    out["ratio_compare_p50_over_completions_p50"] = round(p50["compare"] / p50["completions"], 2)
    out["ratio_compare_p50_over_completions_logprobs_p50"] = round(p50["compare"] / p50["completions_logprobs"], 2)
    out["ratio_compare_p50_over_sequential_p50"] = round(p50["compare"] / p50["sequential"], 2)
    out["light_p50_ms"] = {k: round(v, 1) for k, v in light.items()}
    out["light_ratio_compare_over_completions"] = round(light["compare"] / light["completions"], 2)
    out["light_ratio_compare_over_sequential"] = round(light["compare"] / light["sequential"], 2)
    out["load_average_1min"] = os.getloadavg()[0]
    out["target_ratio_max"] = 1.3
    print(json.dumps(out))
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
