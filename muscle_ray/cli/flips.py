"""`muscle flips OLD NEW [--compat COMPAT]`: what broke in an update, and is it real?"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from muscle_ray.cli.options import add_config_arguments, load
from muscle_ray.errors import MuscleError
from muscle_ray.metrics.text import SIMILARITIES


class FlipsConfig(BaseModel):
    """What to compare and how: the flags of `muscle flips`, or the same fields in a YAML file."""

    model_config = ConfigDict(extra="forbid")
    old: str
    new: str
    compat: str | None = None
    metric: str | None = None  # one of SIMILARITIES; None: the `score` column as it is
    epsilon: float = Field(0.0, ge=0)
    format: Literal["table", "json"] = "table"
    out: str | None = None
    bootstrap: int = Field(2000, ge=0)
    seed: int = 0
    bertscore_model: str | None = None
    lmeval_metric: str | None = None
    lmeval_filter: str | None = None
    allow_task_mismatch: bool = False

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v):
        if v is not None and v not in SIMILARITIES:
            raise ValueError(f"expected one of {', '.join(SIMILARITIES)}")
        return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "old", nargs="?", help="old model's results: Parquet file/dir, results JSONL, or lm-eval samples_<task>_*.jsonl"
    )
    parser.add_argument("new", nargs="?", help="new model's results (same forms)")
    add_config_arguments(parser, what="file with the fields below (old, new, compat, metric, ...)")
    parser.add_argument(
        "--compat", help="the compatibility model's results: adds the paper's ΔNFR_c, Δacc_c, ... columns"
    )
    parser.add_argument(
        "--metric",
        choices=SIMILARITIES,
        help="recompute S from prediction/reference with this similarity (default: use the 'score' column)",
    )
    parser.add_argument("--epsilon", type=float, help="continuous flips need |D| > epsilon (default 0)")
    parser.add_argument(
        "--json", action="store_const", const="json", dest="format", help="print one JSON object instead of a table"
    )
    parser.add_argument("--out", help="write flips.parquet, summary.json and PNG plots here")
    parser.add_argument("--bootstrap", type=int, help="bootstrap replicates for the 95%% CIs (default 2000)")
    parser.add_argument("--seed", type=int, help="bootstrap seed (default 0)")
    parser.add_argument("--bertscore-model", help="local model directory for BERTScore (default: bundled MiniLM-L6)")
    parser.add_argument(
        "--lmeval-metric", help="which per-sample lm-eval metric is correctness (default acc, else exact_match)"
    )
    parser.add_argument("--lmeval-filter", help="which lm-eval filter's lines to read (default: the file's first)")
    parser.add_argument(
        "--allow-task-mismatch",
        action="store_const",
        const=True,
        help="compare result sets of different tasks (their ids join by accident otherwise refused)",
    )


def run(args: argparse.Namespace) -> int:
    with _plain_memory():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from muscle_ray.metrics.compare import columns_for, compare, compat_deltas
    from muscle_ray.metrics.table import format_table
    from muscle_ray.results import read_results

    names = (
        "old",
        "new",
        "compat",
        "metric",
        "epsilon",
        "format",
        "out",
        "bootstrap",
        "seed",
        "bertscore_model",
        "lmeval_metric",
        "lmeval_filter",
        "allow_task_mismatch",
    )
    cfg = load(FlipsConfig, args, {name: getattr(args, name) for name in names})

    def read(path: str):
        # ids are checked for duplicates by the join itself (one hash pass instead of three);
        # answers compare as dictionary codes where the files store them so (multiple choice)
        return read_results(
            path,
            columns=columns_for(cfg.metric),
            unique_ids=False,
            dictionary=["prediction"] if cfg.metric is None else [],
            lmeval_metric=cfg.lmeval_metric,
            lmeval_filter=cfg.lmeval_filter,
        )

    old = read(cfg.old)

    def against_old(path: str):
        return compare(
            old,
            read(path),
            names=(cfg.old, path),
            metric=cfg.metric,
            epsilon=cfg.epsilon,
            n_boot=cfg.bootstrap,
            seed=cfg.seed,
            bertscore_model=cfg.bertscore_model,
            allow_task_mismatch=cfg.allow_task_mismatch,
        )

    try:
        base = against_old(cfg.new)
        comp = against_old(cfg.compat) if cfg.compat else None
    except ValueError as e:  # e.g. a BERTScore model directory that is not there
        raise MuscleError(f"--metric {cfg.metric}: {e}") from None
    summary = dict(base.summary)
    if comp is not None:
        summary["compat"] = comp.summary
        summary["deltas"] = compat_deltas(base.summary, comp.summary)
        if comp.summary["n"] != base.summary["n"]:
            print(
                f"muscle flips: warning: old->new joins {base.summary['n']} ids, old->compat "
                f"{comp.summary['n']}; the deltas compare different instance sets",
                file=sys.stderr,
            )
    if cfg.out:
        try:
            _write_out(Path(cfg.out), base, comp, summary)
        except OSError as e:  # /proc/x, a file in the way, a read-only directory, a full disk
            reason = e.strerror or str(e)
            if e.filename and str(e.filename) != cfg.out:
                reason += f" ({e.filename})"
            raise MuscleError(f"--out {cfg.out}: cannot write there: {reason}") from None
    print(json.dumps(summary) if cfg.format == "json" else format_table(summary))
    return 0


@contextmanager
def _plain_memory() -> Iterator[None]:
    """Arrow memory from malloc, numpy's without huge-page advice, while the command runs;
    the previous settings after (tests call `main` in-process).

    A comparison allocates gigabytes once, and on the 2-core benchmark VM (transparent huge
    pages on madvise, seldom granted) fresh memory is what costs: numpy advises huge pages
    for arrays of 4 MiB and up, and each page fault there stalls on a compaction attempt;
    memory from Arrow's bundled mimalloc faults rarely but slowly. Measured there on two
    10M-row result sets: system time 3.5-4.2 s with mimalloc, 1.5-2.4 s with malloc, a
    steady ~1.6 s with numpy's advice off too; large Arrow concatenations ran 3-5x faster.
    And glibc's malloc keeps what is freed (`_keep_freed_memory`).
    """
    import numpy as np
    import pyarrow as pa

    core = getattr(np, "_core", None) or getattr(np, "core")  # numpy 2, numpy 1.x
    set_hugepage = core.multiarray._set_madvise_hugepage  # documented in numpy's global_state
    pool, hugepage = pa.default_memory_pool(), set_hugepage(False)
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        with _keep_freed_memory():
            yield
    finally:
        pa.set_memory_pool(pool)
        set_hugepage(hugepage)


# glibc mallopt(3) parameters and their defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextmanager
def _keep_freed_memory() -> Iterator[None]:
    """glibc's malloc without mmap and without trimming while the command runs, so memory freed
    by one step is reused by the next without page faults; released after (`malloc_trim`).

    By default glibc maps large blocks (from 128 KiB, adaptively up to 32 MiB) with mmap and
    unmaps them on free, so each of the join's 40-200 MB temporaries faults in fresh, zeroed
    pages: on two 10M-row result sets ~900k minor faults and 2 s of system time, from the heap
    ~450k and 0.9 s. No-op where the C library is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        yield
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        trim(0)


def _write_out(out: Path, base, comp, summary: dict) -> None:
    import numpy as np

    from muscle_ray.metrics import plots
    from muscle_ray.results import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(base.flip_table(), out / "flips.parquet")
    plots.quadrant_bars(base.summary, out / "quadrants.png")
    binary = bool(np.isin(base.s_old, (0.0, 1.0)).all() and np.isin(base.s_new, (0.0, 1.0)).all())
    if base.summary["kind"] == "continuous" or not binary:
        plots.d_histogram(base.s_new - base.s_old, base.summary["metric"], base.epsilon, out / "d_hist.png")
    if comp is not None:
        write_atomic(comp.flip_table(), out / "flips_compat.parquet")
        plots.quadrant_bars(comp.summary, out / "quadrants_compat.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
