"""Benchmark `muscle flips --json` end to end on two 10-million-row result files.

Generates OLD and NEW multiple-choice result sets with every column the scoring job writes
(`muscle_ray.scoring.rows.RESULT_SCHEMA`, ARC-style ids such as 'Mercury_SC_4157021'), once:
they are cached under --dir (default /tmp/muscle-bench-flips) and reused while their row count
and schema still match. Ids are shuffled differently on each side and overlap except for 1,000
per side. Then it runs the real console script in a subprocess --runs times and reports the
median wall time, input rows per second, each run's CPU time (user + sys, less sensitive than
wall time to a busy machine) and its system part, the children's peak RSS, the ratio to a bare
Parquet read of the same columns timed in the same run, and the load average. Prints one JSON
line. Target: < 5 s on 2 cores.

    .venv/bin/python bench/bench_flips.py [--rows 10000000] [--dir /tmp/muscle-bench-flips] [--runs 3] [--muscle EXE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TARGET_S = 5.0
BATCH = 1 << 20  # rows per generated batch, one Parquet row group each (pq.write_table's default size)
FLIPS_COLUMNS = ["id", "task", "correct", "score", "prediction"]  # what `muscle flips` reads by default


def result_schema() -> pa.Schema:
    from muscle_ray.scoring.rows import RESULT_SCHEMA  # imports the task registry: only when generating

    return RESULT_SCHEMA


def make_batch(k: np.ndarray, rng: np.random.Generator, accuracy: float, version: str, schema: pa.Schema) -> pa.Table:
    """Rows for instances k (4-way multiple choice) as the scoring job writes them (`scoring.rows.mc_row`)."""
    m = len(k)
    ids = pc.binary_join_element_wise("Mercury_SC_", pa.array(k).cast(pa.string()), "")
    gold = (k * 7919) % 4  # the same gold answer for the same id on both sides
    correct = rng.random(m) < accuracy
    pred = np.where(correct, gold, (gold + rng.integers(1, 4, size=m)) % 4)
    logliks = rng.normal(-8.0, 2.0, size=(m, 4))
    logliks[np.arange(m), pred] = logliks.max(axis=1) + 0.5  # the argmax is the prediction
    chars = rng.integers(5, 80, size=(m, 4))
    pred_norm = np.argmax(logliks / chars, axis=1)
    offsets = pa.array(np.arange(0, 4 * m + 1, 4, dtype=np.int32))
    columns = {
        "id": ids,
        "task": pa.repeat("arc_easy", m),
        "correct": pa.array(correct),
        "score": pa.array(correct.astype(np.float64)),
        "prediction": pa.array(pred).cast(pa.string()),
        "reference": pa.array(gold).cast(pa.string()),
        "choice_logliks": pa.ListArray.from_arrays(offsets, pa.array(logliks.ravel())),
        "choice_chars": pa.ListArray.from_arrays(offsets, pa.array(chars.ravel())),
        "pred_norm": pa.array(pred_norm),
        "correct_norm": pa.array(pred_norm == gold),
        "generation": pa.nulls(m, pa.string()),
        "row": pa.array(k),
        "version": pa.repeat(version, m),
        "n_tokens": pa.array(rng.integers(60, 400, size=m)),
    }
    return pa.table(columns).cast(schema)


def ensure(path: Path, n: int, seed: int, accuracy: float, id_offset: int) -> Path:
    """The cached result file, (re)generated when missing or of another size or schema."""
    schema = result_schema()
    if path.exists():
        try:
            if pq.read_metadata(path).num_rows == n and pq.read_schema(path).remove_metadata().equals(schema):
                return path
        except pa.ArrowException:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = rng.permutation(n) + id_offset
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n, BATCH):
            writer.write_table(make_batch(k[start : start + BATCH], rng, accuracy, path.stem, schema))
    os.replace(tmp, path)
    return path


def timed(cmd: list[str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Wall, CPU (user + sys) and system seconds of one subprocess run: system time is mostly
    page faults on fresh memory, the part that moves with how memory is allocated."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys_s = after.ru_stime - before.ru_stime
    return wall, after.ru_utime - before.ru_utime + sys_s, sys_s, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/muscle-bench-flips"), help="where the files are cached")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--muscle", help="the `muscle` executable to time (default: this venv's), e.g. another checkout's")
    args = ap.parse_args()
    t0 = time.perf_counter()
    old = ensure(args.dir / f"old_{args.rows}.parquet", args.rows, seed=1, accuracy=0.70, id_offset=0)
    new = ensure(args.dir / f"new_{args.rows}.parquet", args.rows, seed=2, accuracy=0.75, id_offset=1000)
    gen_s = time.perf_counter() - t0
    load_before = os.getloadavg()[0]

    # Baseline in the same run: a bare Parquet read of the columns flips needs, so the
    # report has a ratio that survives a busy machine.
    read = "import sys, pyarrow.parquet as pq; [pq.read_table(f, columns=sys.argv[1].split(',')) for f in sys.argv[2:]]"
    read_wall, _, _, _ = timed([sys.executable, "-c", read, ",".join(FLIPS_COLUMNS), str(old), str(new)])

    muscle = args.muscle or str(Path(sys.executable).parent / "muscle")
    walls, cpus, syss, outputs = [], [], [], set()
    for _ in range(args.runs):
        wall, cpu, sys_s, proc = timed([muscle, "flips", str(old), str(new), "--json"])
        if proc.returncode != 0:
            sys.exit(f"muscle flips failed ({proc.returncode}): {proc.stderr.strip()}")
        walls.append(wall)
        cpus.append(cpu)
        syss.append(sys_s)
        outputs.add(proc.stdout)
    if len(outputs) != 1:
        sys.exit("muscle flips printed different summaries for the same files")
    summary = json.loads(outputs.pop())
    wall = statistics.median(walls)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest child
    print(
        json.dumps(
            {
                "rows_per_file": args.rows,
                "generate_s": round(gen_s, 2),
                "flips_wall_s": round(wall, 2),  # median of the runs
                "flips_walls_s": [round(w, 2) for w in walls],
                "flips_cpu_s": [round(c, 2) for c in cpus],
                "flips_sys_s": [round(c, 2) for c in syss],  # of the CPU time
                "rows_per_s": round(2 * args.rows / wall),  # input rows, OLD and NEW together
                "peak_rss_mib": round(peak_kib / 1024, 1),
                "bare_read_s": round(read_wall, 2),
                "flips_over_bare_read": round(wall / read_wall, 2),
                "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
                "target_s": TARGET_S,
                "within_target": wall < TARGET_S,
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
