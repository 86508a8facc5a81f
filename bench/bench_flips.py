"""Benchmark `muscle flips --json` on two 10-million-row result files.

Generates OLD and NEW multiple-choice result sets (under bench/out/, gitignored; reused
when present) whose ids are shuffled differently and overlap except for 1,000 per side,
then times the real console script in a subprocess: wall time and the child's peak RSS
(resource.getrusage(RUSAGE_CHILDREN)), its CPU time, and the ratio to a bare Parquet
read of the same columns timed in the same run. Prints one JSON line. Target: < 10 s on 2 cores.

    .venv/bin/python bench/bench_flips.py [--rows 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def make_results(n: int, seed: int, accuracy: float, id_offset: int) -> pa.Table:
    """n rows of 4-way multiple choice, ids 'q<k>' for k in [id_offset, id_offset + n), shuffled."""
    rng = np.random.default_rng(seed)
    k = rng.permutation(n) + id_offset
    ids = pc.binary_join_element_wise("q", pa.array(k).cast(pa.string()), "")
    gold = (k * 7919) % 4  # the same gold answer for the same id on both sides
    correct = rng.random(n) < accuracy
    wrong = (gold + rng.integers(1, 4, size=n)) % 4
    pred = np.where(correct, gold, wrong)
    return pa.table(
        {
            "id": ids,
            "task": pa.repeat("mc", n),
            "correct": pa.array(correct),
            "score": pa.array(correct.astype(np.float64)),
            "prediction": pa.array(pred).cast(pa.string()),
            "reference": pa.array(gold).cast(pa.string()),
        }
    )


def ensure(path: Path, n: int, seed: int, accuracy: float, id_offset: int) -> Path:
    if path.exists() and pq.read_metadata(path).num_rows == n:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(make_results(n, seed, accuracy, id_offset), path, row_group_size=1 << 20)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    old = ensure(OUT / f"old_{args.rows}.parquet", args.rows, seed=1, accuracy=0.70, id_offset=0)
    new = ensure(OUT / f"new_{args.rows}.parquet", args.rows, seed=2, accuracy=0.75, id_offset=1000)
    gen_s = time.perf_counter() - t0

    # Baseline in the same run: a bare Parquet read of the columns flips needs, so the
    # report has a ratio that survives a busy machine.
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pyarrow.parquet as pq; "
            "[pq.read_table(f, columns=['id', 'correct', 'score', 'prediction']) for f in sys.argv[1:]]",
            str(old),
            str(new),
        ],
        check=True,
    )
    read_wall = time.perf_counter() - start

    muscle = Path(sys.executable).parent / "muscle"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(muscle), "flips", str(old), str(new), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"muscle flips failed ({proc.returncode}): {proc.stderr.strip()}")
    summary = json.loads(proc.stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak_kib = after.ru_maxrss  # Linux: KiB, the largest child (flips, not the bare read)
    print(
        json.dumps(
            {
                "rows_per_file": args.rows,
                "generate_s": round(gen_s, 2),
                "flips_wall_s": round(wall, 2),
                "flips_cpu_s": round(cpu, 2),  # user + sys: less sensitive than wall to a busy machine
                "peak_rss_mib": round(peak_kib / 1024, 1),
                "bare_read_s": round(read_wall, 2),
                "flips_over_bare_read": round(wall / read_wall, 2),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "target_s": 10.0,
                "within_target": wall < 10.0,
                "cpus": os.cpu_count(),
                "n_joined": summary["n"],
                "only_old": summary["only_old"],
                "only_new": summary["only_new"],
                "nfr": summary["nfr"],
                "pfr": summary["pfr"],
            }
        )
    )


if __name__ == "__main__":
    main()
