"""A task's records as input shards on disk, so the scoring driver holds none of them.

A Ray task (not the driver) streams `task.records(path)` and writes the first `limit` of them as
one Parquet file per output shard::

    OUT/_input/<task>/_input-00000.parquet  ord, row, record (the pickled Record), error
    OUT/_input/<task>/_input.json           what they were made from; written last

(Named unlike result shards, and "_"-prefixed so results readers skip them.)

`error` is "" or the reason a record is quarantined without scoring: a duplicate id. The task
returns only the record count and the duplicate map, so driver memory does not grow with the
input; the scoring pass reads the shards through Ray Data (`job._read_inputs`). A rerun whose data file
(path, size, mtime), limit, shard size and task are unchanged reuses the shards.

Ids are checked in 16 bytes a record (input index and a 64-bit hash in two arrays, not a dict of
strings: 1M ids as Python strings in a dict take ~150 MB); only records whose hash is seen more
than once are parsed again and compared by their real ids.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.results import write_atomic
from muscle_ray.tasks.base import Record, Task, get_task

INPUT_SCHEMA = pa.schema([("ord", pa.int64()), ("row", pa.int64()), ("record", pa.binary()), ("error", pa.string())])
MANIFEST = "_input.json"


def input_dir(out: str | Path, task: str) -> Path:
    """OUT/_input/<task>, the task name made a plain folder name (`lmeval:arc_easy`)."""
    return Path(out) / "_input" / re.sub(r"[^A-Za-z0-9_.-]", "-", task)


def input_shard(d: Path, k: int) -> Path:
    return d / f"_input-{k:05d}.parquet"


@dataclass(frozen=True)
class Inputs:
    """The input shards of one run: where they are, how many records, which are duplicates."""

    dir: Path
    records: int
    shard_size: int
    duplicates: dict[int, str]  # input index -> reason
    reused: bool = False

    @property
    def n_shards(self) -> int:
        return -(-self.records // self.shard_size)

    def rows_in(self, k: int) -> int:
        return min((k + 1) * self.shard_size, self.records) - k * self.shard_size

    def files(self, shards: Iterable[int]) -> list[str]:
        return [str(input_shard(self.dir, k)) for k in shards]


# --- duplicate ids, in little memory --------------------------------------------------------


class IdHashes:
    """(input index, 64-bit hash of the id) of every parsable record, in two flat arrays."""

    def __init__(self, hash_fn: Callable[[str], int] = hash):
        self.hash_fn = hash_fn  # `hash` is stable within the process that adds and checks
        self.ords = array("q")
        self.hashes = array("q")

    def add(self, k: int, id_: str) -> None:
        self.ords.append(k)
        self.hashes.append(self.hash_fn(id_))

    def candidates(self) -> list[int]:
        """Input indices whose hash another record shares: every true duplicate, and maybe a
        few records that only collide (`first_seen` tells them apart)."""
        h = np.frombuffer(self.hashes, dtype=np.int64) if self.hashes else np.zeros(0, np.int64)
        if len(h) < 2:
            return []
        order = np.argsort(h, kind="stable")
        s = h[order]
        same = np.zeros(len(s), dtype=bool)
        eq = s[1:] == s[:-1]
        same[1:] |= eq
        same[:-1] |= eq
        ords = np.frombuffer(self.ords, dtype=np.int64)
        return sorted(ords[order[same]].tolist())


def first_seen(task: Task, records: Iterable[tuple[int, Record]]) -> dict[int, str]:
    """Input index -> reason for each record whose id an earlier one of `records` (given in
    input order) has; fed the hash candidates, this is the answer for the whole input."""
    first: dict[str, int] = {}
    out = {}
    for k, rec in records:
        id_ = task.parse(rec).id
        if id_ in first:
            out[k] = f"duplicate id {id_!r}, first seen at row {first[id_]}"
        else:
            first[id_] = rec.row
    return out


def parsed_id(task: Task, rec: Record) -> str | None:
    try:
        return task.parse(rec).id
    except BadRow:
        return None  # quarantined by the scoring actor, with its own reason


def duplicate_ids(task: Task, records: Sequence[Record]) -> dict[int, str]:
    """Input index -> reason, for every record whose id an earlier record already has: a result
    set holds each id once (`muscle flips` joins on it), so the second one is quarantined."""
    ids = IdHashes()
    for k, rec in enumerate(records):
        id_ = parsed_id(task, rec)
        if id_ is not None:
            ids.add(k, id_)
    return first_seen(task, ((k, records[k]) for k in ids.candidates()))


# --- writing the shards (in a Ray task) -----------------------------------------------------


def write_inputs(
    task_name: str, task_options: dict, data: str, d: str, limit: int | None, shard_size: int
) -> tuple[int, dict[int, str]]:
    """Stream the task's records into input shards under `d`; (records, duplicate map)."""
    task = get_task(task_name, **task_options)
    d_ = Path(d)
    ids = IdHashes()
    buf: list[tuple[int, Record]] = []
    n = 0
    for n, rec in enumerate(islice(task.records(data), limit), start=1):
        id_ = parsed_id(task, rec)
        if id_ is not None:
            ids.add(n - 1, id_)
        buf.append((n - 1, rec))
        if len(buf) == shard_size:
            _write_shard(d_, (n - 1) // shard_size, buf)
            buf = []
    if buf:
        _write_shard(d_, (n - 1) // shard_size, buf)
    duplicates = first_seen(task, _read_records(d_, ids.candidates(), shard_size))
    _mark(d_, duplicates, shard_size)
    return n, duplicates


def _write_shard(d: Path, k: int, records: list[tuple[int, Record]]) -> None:
    table = pa.Table.from_pydict(
        {
            "ord": [i for i, _ in records],
            "row": [r.row for _, r in records],
            "record": [pickle.dumps(r) for _, r in records],  # bytes: Arrow-safe, any text
            "error": [""] * len(records),  # `_mark` fills in the duplicates
        },
        schema=INPUT_SCHEMA,
    )
    write_atomic(table, input_shard(d, k))


def _read_records(d: Path, ords: list[int], shard_size: int) -> Iterable[tuple[int, Record]]:
    """The records at input indices `ords` (sorted), read back from their shards."""
    by_shard: dict[int, list[int]] = {}
    for i in ords:
        by_shard.setdefault(i // shard_size, []).append(i)
    for k, wanted in sorted(by_shard.items()):
        blobs = pq.read_table(input_shard(d, k), columns=["record"]).column("record")
        for i in wanted:
            yield i, pickle.loads(blobs[i - k * shard_size].as_py())


def _mark(d: Path, duplicates: dict[int, str], shard_size: int) -> None:
    """Rewrite the shards that hold duplicates with their reasons in `error`."""
    for k in sorted({i // shard_size for i in duplicates}):
        f = input_shard(d, k)
        table = pq.read_table(f)
        errors = [duplicates.get(i, "") for i in table.column("ord").to_pylist()]
        write_atomic(table.set_column(INPUT_SCHEMA.get_field_index("error"), "error", pa.array(errors, pa.string())), f)


# --- the driver's side ----------------------------------------------------------------------


def fingerprint(task: str, task_options: dict, data: str, limit: int | None, shard_size: int) -> dict:
    st = Path(data).stat()
    return {
        "task": task,
        "task_options": task_options,
        "data": str(Path(data).resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "limit": limit,
        "shard_size": shard_size,
    }


def _reusable(d: Path, fp: dict) -> Inputs | None:
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fp:
        return None
    inputs = Inputs(
        d,
        int(manifest["records"]),
        fp["shard_size"],
        {int(k): v for k, v in manifest["duplicates"].items()},
        reused=True,
    )
    if not all(input_shard(d, k).is_file() for k in range(inputs.n_shards)):
        return None
    return inputs


def prepare_inputs(
    task: str,
    task_options: dict,
    data: str,
    out: str | Path,
    limit: int | None,
    shard_size: int,
    log=print,
    remote: bool = True,
) -> Inputs:
    """The run's input shards under OUT/_input/<task>: reused when they match, else written by a
    Ray task on this node (`remote=False`: in this process, for tests)."""
    if not Path(data).exists():
        raise MuscleError(f"{data}: no such file (input of task {task})")
    d = input_dir(out, task)
    fp = fingerprint(task, task_options, data, limit, shard_size)
    found = _reusable(d, fp)
    if found is not None:
        log(f"[{task}] reusing the input shards in {d} ({found.records} records)")
        return found
    d.mkdir(parents=True, exist_ok=True)
    (d / MANIFEST).unlink(missing_ok=True)  # the shards below are not valid until it is back
    for f in [*d.glob("_input-*.parquet"), *d.glob(".*.tmp")]:
        f.unlink()
    args = (task, task_options, data, str(d), limit, shard_size)
    n, duplicates = _run_remote(*args) if remote else write_inputs(*args)
    manifest = {"fingerprint": fp, "records": n, "duplicates": {str(k): v for k, v in sorted(duplicates.items())}}
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, d / MANIFEST)
    return Inputs(d, n, shard_size, duplicates)


def _run_remote(*args) -> tuple[int, dict[int, str]]:
    """`write_inputs` on this node (`runtime.run_here`): the shards are local files the driver reads back."""
    from muscle_ray.runtime import run_here

    return run_here(write_inputs, *args)
