"""Reading, validating and writing result sets (the contract itself is in `schema.py`).

A result set may also be a JSON Lines file: either rows of this format, one object a line,
or an lm-evaluation-harness `--log_samples` file (`samples_<task>_<date>.jsonl`), which
`read_jsonl` maps into this format.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muscle_ray.errors import MuscleError
from muscle_ray.lmeval import read_jsonl
from muscle_ray.schema import ERRORS_FILE, MC_COLUMNS, REQUIRED


def parquet_files(path: str | Path) -> list[Path]:
    """The result shards under `path` (a file, or a directory searched recursively)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.name != ERRORS_FILE and not f.name.startswith((".", "_")))
        if not files:
            raise MuscleError(f"{p}: directory holds no Parquet result shards")
        return files
    raise MuscleError(f"{p}: no such file or directory")


def _conform(table: pa.Table, source: str, required=None) -> pa.Table:
    """Cast the contract's columns to their types; name the column that cannot be."""
    required = REQUIRED if required is None else required
    for name, typ in {**REQUIRED, **MC_COLUMNS}.items():
        if name not in table.column_names:
            if name in required:
                raise MuscleError(f"{source}: missing column '{name}' (results format needs {sorted(REQUIRED)})")
            continue
        col = table.column(name)
        if pa.types.is_dictionary(col.type) and col.type.value_type == typ:
            continue
        if col.type != typ:
            try:
                col = col.cast(typ)
            except pa.ArrowException as e:
                raise MuscleError(f"{source}: column '{name}' has type {col.type}, expected {typ} ({e})") from None
            table = table.set_column(table.schema.get_field_index(name), name, col)
    return table


def validate(table: pa.Table, source: str, required=None, unique_ids: bool = True) -> pa.Table:
    """Check the contract: columns and types, non-null unique ids, finite scores.

    `required` (default: all of REQUIRED) narrows the columns that must be present, for
    readers that load only the columns they use. `unique_ids=False` leaves the uniqueness
    check (a hash pass over every id) to a caller that hashes the ids anyway, e.g. the join
    in `muscle_ray.metrics.flips.pair`.
    """
    table = _conform(table, source, required)
    ids = table.column("id")
    if ids.null_count:
        row = int(np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))[0])
        raise MuscleError(f"{source}: column 'id' is null at row {row}")
    if unique_ids and pc.count_distinct(ids).as_py() != len(ids):
        arr = ids.to_numpy(zero_copy_only=False)
        _, first, counts = np.unique(arr, return_index=True, return_counts=True)
        dup_value = arr[first[counts > 1]][0]
        rows = np.flatnonzero(arr == dup_value)[:2].tolist()
        raise MuscleError(f"{source}: column 'id' has duplicate id {dup_value!r} at rows {rows[0]} and {rows[1]}")
    if "score" not in table.column_names or _all_finite(table.column("score")):
        return table
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    bad = ~np.isfinite(score)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise MuscleError(f"{source}: column 'score' is {float(score[row])} at row {row} (id {ids[row].as_py()!r})")
    return table


def _all_finite(column: pa.ChunkedArray) -> bool:
    """No null, NaN or infinite value: the common case checked by Arrow alone (`to_numpy`
    imports pandas, a third of a second); False sends the caller to find the bad row."""
    if not pa.types.is_floating(column.type) or column.null_count:
        return False
    return pc.all(pc.is_finite(column)).as_py() is not False


def sniff_format(path: Path) -> str:
    """'parquet' or 'jsonl', from the suffix or else the first bytes; MuscleError otherwise."""
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.lstrip().startswith(b"{"):
        return "jsonl"
    raise MuscleError(f"{path}: neither a Parquet file nor JSON Lines (expected .parquet or .jsonl)")


def _read_parquet(files: list[Path], path, columns, dictionary=()) -> pa.Table:
    """Read shards, each cast to the contract on its own, so a bad shard is named, not merged."""
    encoded = _dictionary_encoded(files, [c for c in dictionary if columns is None or c in columns])
    tables = []
    for f in files:
        try:
            table = _read_shard(f, columns, encoded)
        except (pa.ArrowException, OSError) as e:
            raise MuscleError(f"{f}: not a readable Parquet file ({e})") from None
        required = None if columns is None else {k: v for k, v in REQUIRED.items() if k in columns}
        tables.append(_conform(table, str(f), required))
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise MuscleError(f"{path}: shards have incompatible schemas ({e})") from None


def _dictionary_encoded(files: list[Path], names: list[str]) -> list[str]:
    """Those of `names` that every row group of every shard stores dictionary-encoded (all
    shards then read with one type). Read as a dictionary, such a column costs Arrow its
    indices alone, where plain strings are built value by value (multiple-choice answers
    '0'..'3': 0.1 s instead of 0.3 s for two 10M-row sets); values that a writer stored plain
    (its dictionary outgrew ~1 MiB) Arrow would have to hash back into one. Any doubt (a shard
    that does not read): none, and the read itself reports the problem."""
    keep = set(names)
    try:
        for f in files if keep else ():
            meta = pq.read_metadata(f)
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                keep &= {c.path_in_schema for c in map(group.column, range(group.num_columns)) if _no_plain_values(c)}
    except (pa.ArrowException, OSError):
        return []
    return [n for n in names if n in keep]


def _no_plain_values(chunk: pq.ColumnChunkMetaData) -> bool:
    """A string column chunk with a dictionary and no more bytes than that dictionary (at most
    the usual 1 MiB limit) and 32-bit indices take: so no data page fell back to plain values."""
    return (
        chunk.physical_type == "BYTE_ARRAY"
        and chunk.has_dictionary_page
        and chunk.total_uncompressed_size <= (1 << 20) + 5 * chunk.num_values
    )


def _read_shard(f: Path, columns: list[str] | None, dictionary: Sequence[str] = ()) -> pa.Table:
    """One Parquet file, its row groups read by a thread each (pq.read_table decodes a string
    column on one thread and imports pyarrow.dataset; this reads two 10M-row result sets in
    0.8 s of wall time on 2 cores instead of 2 s)."""
    meta = pq.ParquetFile(f)
    names = set(meta.schema_arrow.names)
    if columns is not None:
        missing = [c for c in columns if c in REQUIRED and c not in names]
        if missing:
            raise MuscleError(f"{f}: missing column '{missing[0]}' (results format needs {sorted(REQUIRED)})")
    wanted = None if columns is None else [c for c in columns if c in names]

    def open_():
        # `task` repeats one value per row: read it dictionary-encoded, so checking it is cheap
        encoded = [c for c in ("task", *dictionary) if c in names]
        try:
            return pq.ParquetFile(f, read_dictionary=encoded or None)
        except KeyError:  # `task` is no plain column (a list, a struct): _conform names the problem
            return pq.ParquetFile(f)

    groups = meta.num_row_groups
    if groups <= 1:
        return open_().read(columns=wanted)
    with ThreadPoolExecutor(min(groups, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda group: open_().read_row_group(group, columns=wanted), range(groups)))
    return pa.concat_tables(parts)


def read_results(
    path: str | Path,
    columns: list[str] | None = None,
    lmeval_metric: str | None = None,
    lmeval_filter: str | None = None,
    unique_ids: bool = True,
    dictionary: Sequence[str] = (),
) -> pa.Table:
    """Read and validate one result set: Parquet file or shard directory, or a JSONL file.

    `columns` loads only those columns (the metrics need few of the many a scorer writes).
    `dictionary` names string columns to read dictionary-encoded where every Parquet shard
    stores them so (then they come as dictionary<string>, else as string).
    JSONL files go through `read_jsonl`; lm-eval sample files are mapped by `lmeval_to_results`
    (`lmeval_metric`, `lmeval_filter` choose which per-sample metric and filter to use).
    """
    p = Path(path)
    files = parquet_files(p)
    if len(files) == 1 and files[0] == p and sniff_format(p) == "jsonl":
        table = read_jsonl(p, metric=lmeval_metric, filter=lmeval_filter)
        if columns is not None:
            table = table.select([c for c in table.column_names if c in columns])
    else:
        table = _read_parquet(files, p, columns, dictionary)
    required = None if columns is None else {k: v for k, v in REQUIRED.items() if k in columns}
    return validate(table, str(path), required, unique_ids=unique_ids)


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
