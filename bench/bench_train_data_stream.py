"""Driver peak RSS of building the training datasets (`training.data.build_datasets`), in
memory (`stream: off`) and streamed (`stream: on`), for generated prompt/completion files.

Each measurement runs in its own driver process (peak RSS only grows), joined to one local Ray
started here, and reports the driver's peak RSS (getrusage) and its RSS before the build (after
its imports and joining Ray), so the growth is what the build itself costs the driver:

    nice -n 19 .venv/bin/python bench/bench_train_data_stream.py            # 10k/200k/1M on, 10k/200k off
    .venv/bin/python bench/bench_train_data_stream.py --sizes 10000 --off 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import PeakRSS  # bench/peak_rss.py: the script's folder is on sys.path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            x, y = rng.randint(1, 99), rng.randint(1, 99)
            prompt = f"item {i}: ann has {x} figs and bob has {y} figs. figs in all?"
            f.write(json.dumps({"prompt": prompt, "completion": f" {x + y}."}) + "\n")


def measure(address: str, path: str, base: str, stream: str, max_length: int) -> dict:
    """In a fresh driver: join Ray, build the datasets, report RSS."""
    from muscle_ray.runtime import init_ray
    from muscle_ray.training.config import DataConfig
    from muscle_ray.training.data import build_datasets

    init_ray(address=address)
    import ray.data  # noqa: F401  (both paths use it: not the build's cost)

    before, peak_before = rss_mb(), peak_mb()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-data-") as work:
        with PeakRSS() as sampled:
            built = build_datasets(DataConfig(path=path, stream=stream, max_length=max_length), base, work)
        seconds = time.perf_counter() - t0
        first = built.train.take(1)[0]  # the rows read back (streamed: by a Ray Data task)
        assert len(first["input_ids"]) == max_length
    return {
        "rows": built.n_train + built.n_val,
        "stream": stream,
        "streamed": built.streamed,
        "seconds": round(seconds, 1),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(sampled.peak / 2**20, 1),  # sampled during the build
        "growth_mb": round(sampled.peak / 2**20 - before, 1),
        "getrusage_peak_before_mb": round(peak_before, 1),
        "getrusage_peak_after_mb": round(peak_mb(), 1),  # also covers the take(1)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000, 1_000_000], help="rows, streamed")
    ap.add_argument("--off", type=int, nargs="*", default=[10_000, 200_000], help="rows, in memory")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--one", nargs=4, metavar=("ADDRESS", "FILE", "BASE", "STREAM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, max_length=args.max_length)))
        return

    import ray

    from muscle_ray.runtime import init_ray
    from muscle_ray.zoo.llama import random_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    base = str(random_model_dir(tmp / "base", seed=0))
    init_ray(num_cpus=2)
    address = ray.get_runtime_context().gcs_address
    results = []
    runs = [(n, "on") for n in args.sizes] + [(n, "off") for n in args.off]
    for n in sorted({n for n, _ in runs}):
        path = tmp / f"rows-{n}.jsonl"
        write_rows(path, n)
        for stream in ("on", "off"):
            if (n, stream) not in runs:
                continue
            cmd = [sys.executable, __file__, "--one", address, str(path), base, stream, "--max-length"]
            out = subprocess.run([*cmd, str(args.max_length)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{n} rows, stream {stream}: failed\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["file_mb"] = round(path.stat().st_size / 2**20, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
        path.unlink()
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    def growth(n, stream):
        return next((r["growth_mb"] for r in results if r["rows"] == n and r["stream"] == stream), None)

    head = f"{'rows':>9} {'file MB':>8} {'stream':>6} {'seconds':>8} {'RSS before':>11} {'peak RSS':>9} {'growth':>8}"
    print(f"\n{head} {'getrusage peak':>15}  (MB; growth = peak RSS sampled in the build - RSS before)")
    for r in results:
        print(
            f"{r['rows']:>9} {r['file_mb']:>8} {r['stream']:>6} {r['seconds']:>8} {r['rss_before_mb']:>11}"
            f" {r['peak_rss_mb']:>9} {r['growth_mb']:>8} {r['getrusage_peak_after_mb']:>15}"
        )
    on = sorted(n for n, s in runs if s == "on")
    if len(on) > 1:
        lo, hi = growth(on[0], "on"), growth(on[-1], "on")
        print(f"streamed: {on[-1] // on[0]}x the rows, driver growth {lo} MB -> {hi} MB")
    for n in sorted(n for n, s in runs if s == "off"):
        off, streamed = growth(n, "off"), growth(n, "on")
        if off is not None and streamed:
            print(f"{n} rows: in-memory growth / streamed growth = {off / max(streamed, 1.0):.1f}x")


if __name__ == "__main__":
    main()
