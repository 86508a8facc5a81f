"""Driver memory of the scoring job as the input grows (issue #16: streaming evaluations).

Scores a generated `mc_jsonl` file (2 options, short texts) with a tiny random Llama (hidden 32,
2 layers) through `run_score`, each size in a fresh process with its own private Ray, and
reports the DRIVER's RSS: before the run (Ray started, everything imported), the peak sampled
every 50 ms during it, and the process's lifetime peak (getrusage). The actors and the input
task are other processes: what grows with the input there is not the driver's. Then rows/s with
1 and 2 workers at one size. Prints one JSON line. Target: the driver's peak within 20% from the
smallest size to the largest.

    .venv/bin/python bench/bench_score_stream.py [--rows 10000,100000,1000000] [--speed-rows 100000]
        [--batch-size 64] [--shard-size 4096] [--job PATH]

`--job PATH` scores with another copy of muscle_ray/scoring/job.py (e.g. the old one, from
`git show HEAD~1:muscle_ray/scoring/job.py`), to compare the driver's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import PeakRSS  # bench/peak_rss.py: the script's folder is on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def write_data(path: Path, n: int) -> Path:
    """n short multiple-choice questions, 2 options each, unique ids."""
    with open(path, "w") as f:
        for i in range(n):
            doc = {"id": f"q{i}", "context": f"The fox {i % 97}", "choices": ["jumps", "sleeps"], "label": i % 2}
            f.write(json.dumps(doc) + "\n")
    return path


def tiny_model(out: Path) -> Path:
    from muscle_ray.zoo.llama import LlamaSpec, random_model_dir

    spec = LlamaSpec(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64
    )
    return random_model_dir(out, spec, seed=0)


def one_run(args) -> dict:
    """In this (fresh) process: start Ray, score, and report the driver's memory and speed."""
    import psutil

    if args.job:  # another copy of the job module, shipped to the actors by value
        import importlib.util

        from ray import cloudpickle

        spec = importlib.util.spec_from_file_location("bench_job", args.job)
        assert spec and spec.loader
        job = importlib.util.module_from_spec(spec)
        sys.modules["bench_job"] = job
        spec.loader.exec_module(job)
        cloudpickle.register_pickle_by_value(job)
    else:
        from muscle_ray.scoring import job

    from muscle_ray.runtime import init_ray
    from muscle_ray.scoring.config import ScoreConfig

    init_ray(num_cpus=args.ray_cpus)
    cfg = ScoreConfig(
        versions=[{"base": args.model}],
        task="mc_jsonl",
        data=args.data,
        out=args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,  # None: sized to the machine (scoring.placement)
    )
    start_rss = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        (s,) = job.run_score(cfg, log=lambda *_: None)
    wall = time.perf_counter() - t0
    return {
        "rows": s.rows,
        "workers": args.workers,
        "start_rss_mb": round(start_rss / MB, 1),
        "peak_rss_mb": round(rss.peak / MB, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "wall_s": round(wall, 1),
        "rows_per_s": s.rows_per_s,  # of the scoring pass (the input task and pool start excluded)
        "rows_per_s_wall": round(s.rows / wall, 1),
    }


def run_child(model: Path, data: Path, out: Path, workers: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"--model={model}",
        f"--data={data}",
        f"--out={out}",
        f"--workers={workers}",
        f"--batch-size={args.batch_size}",
        f"--shard-size={args.shard_size}",
        f"--ray-cpus={args.ray_cpus}",
        *([f"--job={args.job}"] if args.job else []),
        *([f"--cpus-per-worker={args.cpus_per_worker}"] if args.cpus_per_worker else []),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)  # progress, as each run ends
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="10000,100000,1000000")
    p.add_argument("--speed-rows", type=int, default=100000, help="rows for the 1 vs 2 workers speed runs (0: none)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--job", default=None, help="score with this copy of scoring/job.py")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default: sized to the machine")
    # a child process: one run
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(args)))
        return 0

    sizes = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_ = Path(tmp)
        model = tiny_model(tmp_ / "model")
        memory = []
        for n in sizes:
            data = write_data(tmp_ / f"mc-{n}.jsonl", n)
            memory.append(run_child(model, data, tmp_ / f"out-{n}", 1, args))
            (tmp_ / f"mc-{n}.jsonl").unlink()
        speed = {}
        if args.speed_rows:
            data = write_data(tmp_ / "speed.jsonl", args.speed_rows)
            for w in (1, 2):
                speed[w] = run_child(model, data, tmp_ / f"speed-{w}", w, args)
    peaks = [m["peak_rss_mb"] for m in memory]
    growth = peaks[-1] / peaks[0] - 1
    result = {
        "job": args.job or "muscle_ray/scoring/job.py",
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "cpus_per_worker": args.cpus_per_worker or "auto",
        "memory": memory,
        "driver_peak_growth": round(growth, 3),
        "target_growth": 0.2,
        "speed": {
            f"workers_{w}": {k: r[k] for k in ("rows", "rows_per_s", "rows_per_s_wall")} for w, r in speed.items()
        },
    }
    print(json.dumps(result))
    return 0 if growth <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
