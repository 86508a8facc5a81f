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

A result set may also be a JSON Lines file: either rows of this format, one object a line,
or an lm-evaluation-harness `--log_samples` file (`samples_<task>_<date>.jsonl`), which
`read_jsonl` maps into this format.
"""

from __future__ import annotations

import json
import os
import re
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


def _conform(table: pa.Table, source: str, required=None) -> pa.Table:
    """Cast the contract's columns to their types; name the column that cannot be."""
    required = REQUIRED if required is None else required
    for name, typ in {**REQUIRED, **MC_COLUMNS}.items():
        if name not in table.column_names:
            if name in required:
                raise MuscleError(f"{source}: missing column '{name}' (results format needs {sorted(REQUIRED)})")
            continue
        col = table.column(name)
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
    if "score" not in table.column_names:
        return table
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    bad = ~np.isfinite(score)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise MuscleError(f"{source}: column 'score' is {float(score[row])} at row {row} (id {ids[row].as_py()!r})")
    return table


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


def _read_parquet(files: list[Path], path, columns) -> pa.Table:
    tables = []
    for f in files:
        try:
            if columns is None:
                tables.append(pq.read_table(f))
            else:
                names = set(pq.read_schema(f).names)
                missing = [c for c in columns if c in REQUIRED and c not in names]
                if missing:
                    raise MuscleError(
                        f"{f}: missing column '{missing[0]}' (results format needs {sorted(REQUIRED)})"
                    )
                tables.append(pq.read_table(f, columns=[c for c in columns if c in names]))
        except (pa.ArrowInvalid, OSError) as e:
            raise MuscleError(f"{f}: not a readable Parquet file ({e})") from None
    try:
        return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as e:
        raise MuscleError(f"{path}: shards have incompatible schemas ({e})") from None


def read_results(
    path: str | Path,
    columns: list[str] | None = None,
    lmeval_metric: str | None = None,
    lmeval_filter: str | None = None,
    unique_ids: bool = True,
) -> pa.Table:
    """Read and validate one result set: Parquet file or shard directory, or a JSONL file.

    `columns` loads only those columns (the metrics need few of the many a scorer writes).
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
        table = _read_parquet(files, p, columns)
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



# --- Locations: a local path or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://) ---

def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations, which pyarrow.fs resolves; False for plain paths."""
    return "://" in str(location)


def in_workspace(path: str, workspace: str | None) -> str:
    """A relative config path taken under `workspace` (MUSCLE_WORKSPACE: a submitted job runs in
    Ray's unpacked copy of the code, not in the user's checkout); others as they are."""
    return str(Path(workspace) / path) if workspace and not Path(path).is_absolute() else path


def staging_dir(uri: str, staging: str | Path | None, job: str) -> Path:
    """The local directory a URI is staged in: stable per URI, so a rerun finds it again."""
    import hashlib

    if staging is None:
        raise MuscleError(f"{uri}: URIs need a staging directory (run through {job})")
    return Path(staging) / hashlib.sha256(uri.encode()).hexdigest()[:16]


def uri_exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def copy_location(src: str | Path, dst: str | Path) -> None:
    """Copy a file or a directory tree between local paths and URIs (pyarrow.fs.copy_files).

    Object stores have no directories or renames, so jobs write locally and copy the finished
    files out; a reader of the destination sees each file whole or not at all.
    """
    import pyarrow.fs as pafs

    def resolve(loc):
        return pafs.FileSystem.from_uri(str(loc)) if is_uri(loc) else (pafs.LocalFileSystem(), str(Path(loc).resolve()))

    (src_fs, src_path), (dst_fs, dst_path) = resolve(src), resolve(dst)
    info = src_fs.get_file_info(src_path)
    if info.type == pafs.FileType.NotFound:
        raise MuscleError(f"{src}: no such file or directory")
    if isinstance(dst_fs, pafs.LocalFileSystem):   # object stores have no directories to make
        dst_fs.create_dir(dst_path if info.type == pafs.FileType.Directory else str(Path(dst_path).parent),
                          recursive=True)
    try:
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except (OSError, pa.ArrowException) as e:
        raise MuscleError(f"cannot copy {src} to {dst} ({e})") from None


# --- JSON Lines: rows of the results format, or lm-evaluation-harness sample logs ---------

LMEVAL_FIELDS = ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics")
_LMEVAL_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[\d\-.]+)$")


def read_jsonl(path: Path, metric: str | None = None, filter: str | None = None) -> pa.Table:
    """One JSON object a line; lm-eval sample logs are recognised by their `doc_id`/`filtered_resps`."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MuscleError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise MuscleError(f"{path}: line {line_no} is not a JSON object")
            records.append((line_no, rec))
    if not records:
        raise MuscleError(f"{path}: JSONL file holds no records")
    if "doc_id" in records[0][1] and "filtered_resps" in records[0][1]:
        return lmeval_to_results(records, path, metric=metric, filter=filter)
    return _rows_to_table(records, path)


def _rows_to_table(records: list[tuple[int, dict]], path: Path) -> pa.Table:
    """Rows already in the results format; name the first line that breaks a column's type."""
    names = list(dict.fromkeys(k for _, r in records for k in r))
    columns = {}
    for name in names:
        typ = {**REQUIRED, **MC_COLUMNS}.get(name)
        values = [r.get(name) for _, r in records]
        try:
            columns[name] = pa.array(values, type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            for (line_no, _), v in zip(records, values):
                try:
                    pa.array([v], type=typ)
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                    raise MuscleError(f"{path}: column '{name}' has a bad value {v!r} at line {line_no}") from None
            raise MuscleError(f"{path}: column '{name}' has mixed types") from None
    return pa.table(columns)


def lmeval_task_name(path: Path) -> str:
    """`samples_<task>_<date>.jsonl` -> task (lm-eval's EvaluationTracker naming)."""
    m = _LMEVAL_NAME.match(path.stem)
    return m.group("task") if m else path.stem


def lmeval_to_results(
    records: list[tuple[int, dict]], path: Path, metric: str | None = None, filter: str | None = None
) -> pa.Table:
    """Map lm-eval 0.4 `--log_samples` lines into the results format.

    A line (lm_eval/evaluator.py, sanitised by EvaluationTracker.save_results_samples) holds
    doc_id, doc, target (str), arguments ({gen_args_i: {arg_0: context, arg_1: continuation
    or generation kwargs}}), resps, filtered_resps, filter, metrics (names) and one value per
    metric. Log-likelihood answers are sanitised to strings: filtered_resps[i] =
    ["<loglik>", "<is_greedy>"] per option; generations are filtered_resps = ["<text>"].

    Mapping: id = str(doc_id); correct/score from `metric` (default acc, else exact_match,
    else the first listed metric; correct = score == 1 when the metric is 0/1, else null);
    multiple choice: choice_logliks from filtered_resps, choice_chars = option length without
    lm-eval's one-space target delimiter (what acc_norm divides by), prediction = the argmax
    option index (of loglik/chars for acc_norm), reference = gold index; generation:
    prediction = the filtered text, reference = target. A file with several filters (e.g.
    gsm8k's strict-match and flexible-extract) repeats each doc once per filter: `filter`
    picks one (default: the first line's).
    """
    first = records[0][1]
    for line_no, rec in records:
        for field in LMEVAL_FIELDS:
            if field not in rec:
                raise MuscleError(f"{path}: line {line_no}: lm-eval sample lacks field '{field}'")
    filter = filter or first["filter"]
    records = [(n, r) for n, r in records if r["filter"] == filter]
    if not records:
        raise MuscleError(f"{path}: no lm-eval samples with filter {filter!r}")
    listed = list(records[0][1]["metrics"])
    metric = metric or next((m for m in ("acc", "exact_match") if m in listed), listed[0] if listed else None)
    if metric is None:
        raise MuscleError(f"{path}: lm-eval samples list no metrics")

    ids, preds, refs, scores, logliks, chars, doc_hash, prompt_hash = [], [], [], [], [], [], [], []
    multiple_choice = _is_loglikelihood(first)
    for line_no, rec in records:
        value = rec.get(metric)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            raise MuscleError(f"{path}: line {line_no}: column '{metric}' is {value!r}, not a number")
        scores.append(float(value))
        ids.append(str(rec["doc_id"]))
        doc_hash.append(rec.get("doc_hash"))
        prompt_hash.append(rec.get("prompt_hash"))
        if multiple_choice:
            try:
                ll = [float(r[0]) for r in rec["filtered_resps"]]
                conts = [a["arg_1"] for a in rec["arguments"].values()]
            except (TypeError, ValueError, KeyError, IndexError):
                raise MuscleError(f"{path}: line {line_no}: column 'filtered_resps' is not a list of [loglik, is_greedy]") from None
            n = [len(c[1:] if c.startswith(" ") else c) for c in conts]
            logliks.append(ll)
            chars.append(n)
            key = np.array(ll) / np.maximum(np.array(n, dtype=float), 1.0) if metric == "acc_norm" else np.array(ll)
            preds.append(str(int(np.argmax(key))))
            refs.append(_gold_index(rec["target"], conts))
        else:
            fr = rec["filtered_resps"]
            preds.append(str(fr[0] if isinstance(fr, list) and fr else fr))
            refs.append(str(rec["target"]))
    score = np.array(scores, dtype=np.float64)
    binary = bool(np.isin(score[np.isfinite(score)], (0.0, 1.0)).all())
    cols = {
        "id": pa.array(ids, pa.string()),
        "task": pa.array([lmeval_task_name(path)] * len(ids), pa.string()),
        "correct": pa.array(score == 1.0 if binary else [None] * len(ids), pa.bool_()),
        "score": pa.array(score, pa.float64()),
        "prediction": pa.array(preds, pa.string()),
        "reference": pa.array(refs, pa.string()),
    }
    if multiple_choice:
        cols["choice_logliks"] = pa.array(logliks, MC_COLUMNS["choice_logliks"])
        cols["choice_chars"] = pa.array(chars, MC_COLUMNS["choice_chars"])
    cols["doc_hash"] = pa.array(doc_hash, pa.string())
    cols["prompt_hash"] = pa.array(prompt_hash, pa.string())
    return pa.table(cols)


def _is_loglikelihood(rec: dict) -> bool:
    fr = rec["filtered_resps"]
    return isinstance(fr, list) and bool(fr) and all(isinstance(r, list) and len(r) == 2 for r in fr)


def _gold_index(target: str, continuations: list[str]) -> str:
    """lm-eval stores the gold as str(doc_to_target): an index, or the option's text."""
    target = str(target)
    if target.lstrip("-").isdigit():
        return target
    stripped = [c[1:] if c.startswith(" ") else c for c in continuations]
    return str(stripped.index(target)) if target in stripped else target
