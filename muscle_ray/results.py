"""The per-instance results format: the contract between scoring jobs and metrics.

One Parquet file, or a directory of Parquet shards, per (model version, task). Every row is
one evaluated instance. Columns (extra columns are allowed and kept):

=============== ==================== ==================================================
column          type                 meaning
=============== ==================== ==================================================
id              string               stable across versions for the same instance
task            string               task name
correct         bool (nullable)      null where the task is purely continuous
score           float64              1/0 for EM and MC; the metric's value otherwise
prediction      string               chosen option index, or the generated text
reference       string               gold option index, or the reference text
choice_logliks  list<float64>        MC only: summed log-prob of each option
choice_chars    list<int64>          MC only: each option's length in characters
=============== ==================== ==================================================
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muscle_ray.errors import MuscleError

REQUIRED = {
    "id": pa.string(),
    "task": pa.string(),
    "correct": pa.bool_(),
    "score": pa.float64(),
    "prediction": pa.string(),
    "reference": pa.string(),
}
MC_COLUMNS = {
    "choice_logliks": pa.list_(pa.float64()),
    "choice_chars": pa.list_(pa.int64()),
}
SCHEMA = pa.schema([pa.field(k, t) for k, t in {**REQUIRED, **MC_COLUMNS}.items()])
ERRORS_FILE = "errors.parquet"


def parquet_files(path: str | Path) -> list[Path]:
    """The result shards under `path` (a file, or a directory searched recursively)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*.parquet")
            if f.name != ERRORS_FILE and not f.name.startswith((".", "_"))
        )
        if not files:
            raise MuscleError(f"{p}: directory holds no Parquet result shards")
        return files
    raise MuscleError(f"{p}: no such file or directory")


def _conform(table: pa.Table, source: str) -> pa.Table:
    """Cast the contract's columns to their types; name the column that cannot be."""
    for name, typ in {**REQUIRED, **MC_COLUMNS}.items():
        if name not in table.column_names:
            if name in REQUIRED:
                raise MuscleError(f"{source}: missing column '{name}' (results format needs {sorted(REQUIRED)})")
            continue
        col = table.column(name)
        if col.type != typ:
            try:
                col = col.cast(typ)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise MuscleError(f"{source}: column '{name}' has type {col.type}, expected {typ} ({e})") from None
            table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


def validate(table: pa.Table, source: str) -> pa.Table:
    """Check the contract: columns and types, non-null unique ids, finite scores."""
    table = _conform(table, source)
    ids = table.column("id")
    if ids.null_count:
        row = int(np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))[0])
        raise MuscleError(f"{source}: column 'id' is null at row {row}")
    if pc.count_distinct(ids).as_py() != len(ids):
        arr = ids.to_numpy(zero_copy_only=False)
        _, first, counts = np.unique(arr, return_index=True, return_counts=True)
        dup_value = arr[first[counts > 1]][0]
        rows = np.flatnonzero(arr == dup_value)[:2].tolist()
        raise MuscleError(f"{source}: column 'id' has duplicate id {dup_value!r} at rows {rows[0]} and {rows[1]}")
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    bad = ~np.isfinite(score)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise MuscleError(f"{source}: column 'score' is {float(score[row])} at row {row} (id {ids[row].as_py()!r})")
    return table


def read_results(path: str | Path) -> pa.Table:
    """Read and validate one result set (Parquet file or directory of shards)."""
    files = parquet_files(path)
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f))
        except (pa.ArrowInvalid, OSError) as e:
            raise MuscleError(f"{f}: not a readable Parquet file ({e})") from None
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as e:
        raise MuscleError(f"{path}: shards have incompatible schemas ({e})") from None
    return validate(table, str(path))


def write_atomic(table: pa.Table, path: str | Path) -> Path:
    """Write a Parquet file so a reader never sees half of it (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

