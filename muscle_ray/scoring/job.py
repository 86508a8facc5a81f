"""The batch-inference job: a task's records -> Ray Data -> an actor pool of scorers -> shards.

Layout of the output (one results set per version and task, readable by `read_results`)::

    OUT/<version>/<task>/shard-00000.parquet     results format, input rows [0, S), then [S, 2S), ...
    OUT/<version>/<task>/errors.parquet          rows quarantined: row, reason, raw (unparsable, too
                                                 long for the model, a duplicate id, ...)
    OUT/<version>/<task>/_run.json               what produced the shards (checked on resume)
    OUT/summary.json                             rows, rows/s, tokens/s, errors per version
    OUT/.lock                                    held while a run writes here (see out_lock.py)

A shard is a fixed slice of the input (S = shard_size rows), written atomically when its last
row comes back, so a rerun into the same OUT skips finished shards and the final table is the
same as an uninterrupted run's. Within a shard rows keep input order.

Determinism: each MC question is one packed sequence whose log-likelihoods do not depend on
the other questions mathematically, but float32 GEMMs can differ in the last bits with the batch
shape. Predictions are argmaxes over options that differ by far more than that, so they agree
across batch sizes and worker counts (tests/test_score_job.py varies both); log-likelihoods
agree to ~1e-5.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.out_lock import out_lock
from muscle_ray.results import ERRORS_FILE, write_atomic
from muscle_ray.scoring.config import ScoreConfig, VersionSpec
from muscle_ray.scoring.rows import ERROR_SCHEMA, to_table
from muscle_ray.tasks.base import Instance, Record, Task, get_task

if TYPE_CHECKING:  # the backends load torch; the actor imports them when it starts
    from muscle_ray.scoring.backend import Backend


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def _errors_name(k: int) -> str:
    return f"_shard-{k:05d}.errors.parquet"  # "_" hides it from results readers


class ScoreActor:
    """One model version in memory; parses raw records and scores the good ones."""

    def __init__(
        self,
        version: dict,
        task: str,
        task_options: dict,
        backend: Backend,
        batch_size: int,
        threads: int,
        chat_template: bool = False,
    ):
        import ray
        import torch

        from muscle_ray.scoring.backend import make_scorer

        torch.set_num_threads(threads)
        self.actor_id = ray.get_runtime_context().get_actor_id()  # which pool actor scored a row
        spec = VersionSpec(**version)
        self.name = spec.name
        self.task = get_task(task, **task_options)
        self.scorer = make_scorer(backend, spec.model_version(), batch_size, chat_template=chat_template)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["ord"])
        results, errors, good = [""] * n, list(batch["error"]), []  # duplicate ids come marked already
        for i, blob in enumerate(batch["record"]):
            if errors[i]:
                continue
            record: Record = pickle.loads(blob)
            try:
                good.append((i, (record.row, self.task.parse(record))))
            except BadRow as e:
                errors[i] = e.reason
        for (i, _), (result, error) in zip(good, self._score([item for _, item in good])):
            results[i], errors[i] = result, error
        return {
            "ord": batch["ord"],
            "shard": batch["shard"],
            "result": results,
            "error": errors,
            "actor": [self.actor_id] * n,
        }

    def _score(self, items: list[tuple[int, Instance]]) -> list[tuple[str, str]]:
        """(result row as JSON, "") or ("", why it failed) for each (row, Instance).

        A batch that fails is retried one row at a time, so a bad row (a continuation longer than
        the model's context, ...) costs only itself. A MuscleError that is not a BadRow is a
        setting, wrong for every row, and stops the job.
        """
        from muscle_ray.scoring.backend import score_instances

        if not items:
            return []
        try:
            return [(json.dumps(r), "") for r in score_instances(self.scorer, self.task, items, self.name)]
        except MuscleError as e:
            if not isinstance(e, BadRow):
                raise
            if len(items) == 1:
                return [("", e.reason)]
        except Exception as e:
            if len(items) == 1:
                return [("", f"scoring failed: {type(e).__name__}: {' '.join(str(e).split())[:500]}")]
        return [self._score([item])[0] for item in items]


@dataclass
class VersionSummary:
    version: str
    task: str
    out: str
    rows: int  # results rows now on disk
    scored: int  # rows scored in this run
    resumed_shards: int  # shards found finished and skipped
    shards: int
    errors: int
    seconds: float
    rows_per_s: float
    tokens_per_s: float
    actors: list[str] = field(default_factory=list)  # the Ray actors that scored this run's rows


def _load_records(task: Task, path: str, limit: int | None) -> list[Record]:
    if not Path(path).exists():
        raise MuscleError(f"{path}: no such file (input of task {task.name})")
    return list(islice(task.records(path), limit))


def _check_run(out_dir: Path, fingerprint: dict) -> None:
    """Refuse to mix shards from a run with other inputs or settings into this one."""
    f = out_dir / "_run.json"
    if f.exists():
        old = json.loads(f.read_text())
        diff = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
        if diff:
            raise MuscleError(
                f"{out_dir}: holds shards of a different run (differs in {', '.join(diff)}); "
                "use another --out or delete it"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(fingerprint, indent=1))


def _write_errors(out_dir: Path) -> int:
    parts = [pq.read_table(f) for f in sorted(out_dir.glob("_shard-*.errors.parquet"))]
    table = pa.concat_tables(parts) if parts else ERROR_SCHEMA.empty_table()
    write_atomic(table.sort_by("row"), out_dir / ERRORS_FILE)
    return table.num_rows


def score_version(
    cfg: ScoreConfig,
    spec: VersionSpec,
    records: list[Record],
    data: str,
    log=print,
    progress=None,
    skip: dict[int, str] | None = None,
) -> VersionSummary:
    """Score one version into OUT/<version>/<task>; `skip` maps input indices to the reason they
    are quarantined without scoring (duplicate ids)."""
    import ray

    out_dir = Path(cfg.out) / spec.name / cfg.task
    S = cfg.shard_size
    n_shards = -(-len(records) // S)
    _check_run(
        out_dir,
        {
            "task": cfg.task,
            "task_options": cfg.task_options,
            "data": str(Path(data).resolve()),
            "limit": cfg.limit,
            "shard_size": S,
            "records": len(records),
            "backend": cfg.backend,
            "chat_template": cfg.chat_template or None,  # null when off, as in runs from before the field
            "base": str(Path(spec.base).resolve()),
            "adapter": spec.adapter and str(Path(spec.adapter).resolve()),
        },
    )
    for stale in out_dir.glob(".*.tmp"):  # a writer killed mid-write left its temp file behind
        stale.unlink(missing_ok=True)
    done = {k for k in range(n_shards) if (out_dir / shard_name(k)).exists()}
    skip = skip or {}
    todo: list[dict[str, Any]] = [  # the record as bytes: Arrow-safe, any text
        {"ord": i, "shard": i // S, "record": pickle.dumps(rec), "error": skip.get(i, "")}
        for i, rec in enumerate(records)
        if i // S not in done
    ]
    if done:
        log(f"[{spec.name}/{cfg.task}] resuming: {len(done)}/{n_shards} shards already done")
    start, scored, tokens, new_errors, actors = time.perf_counter(), 0, 0, 0, set()
    old_errors = sum(
        pq.read_metadata(f).num_rows for f in out_dir.glob("_shard-*.errors.parquet") if int(f.name[7:12]) in done
    )
    if todo:
        expected: dict[int, int] = {}
        for item in todo:
            expected[item["shard"]] = expected.get(item["shard"], 0) + 1
        lo, hi = cfg.workers
        pool = ray.data.ActorPoolStrategy(size=lo) if lo == hi else ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)
        ds = ray.data.from_items(todo).map_batches(
            ScoreActor,
            fn_constructor_kwargs=dict(
                version=spec.model_dump(),
                task=cfg.task,
                task_options=cfg.task_options,
                backend=cfg.backend,
                batch_size=cfg.batch_size,
                threads=max(1, round(cfg.cpus_per_worker)),
                chat_template=cfg.chat_template,
            ),
            batch_size=cfg.batch_size * 4,
            compute=pool,
            num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker or None,
        )
        pending: dict[int, list[dict]] = {}
        for out in ds.iter_rows():
            k = int(out["shard"])
            actors.add(out["actor"])
            if progress:
                progress(1)  # one more row back from the pool
            pending.setdefault(k, []).append(out)
            if len(pending[k]) < expected[k]:
                continue
            parts = sorted(pending.pop(k), key=lambda o: int(o["ord"]))
            results = [json.loads(o["result"]) for o in parts if o["result"]]
            bad = [
                {
                    "row": records[int(o["ord"])].row,
                    "reason": o["error"],
                    "raw": records[int(o["ord"])].text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                }
                for o in parts
                if o["error"]
            ]
            if bad:
                write_atomic(pa.Table.from_pylist(bad, schema=ERROR_SCHEMA), out_dir / _errors_name(k))
            write_atomic(to_table(results), out_dir / shard_name(k))
            done.add(k)
            scored += len(results)
            tokens += sum(r["n_tokens"] for r in results)
            new_errors += len(bad)
            log(
                f"[{spec.name}/{cfg.task}] shard {k + 1}/{n_shards} written: {len(results)} rows"
                + (f", {len(bad)} bad" if bad else "")
                + f" ({len(done)}/{n_shards} done)"
            )
            if cfg.max_errors is not None and old_errors + new_errors > cfg.max_errors:
                _write_errors(out_dir)
                raise MuscleError(
                    f"{out_dir / ERRORS_FILE}: {old_errors + new_errors} bad rows so far, "
                    f"more than --max-errors {cfg.max_errors}"
                )
    n_errors = _write_errors(out_dir)
    if cfg.max_errors is not None and n_errors > cfg.max_errors:
        raise MuscleError(f"{out_dir / ERRORS_FILE}: {n_errors} bad rows, more than --max-errors {cfg.max_errors}")
    seconds = time.perf_counter() - start
    rows = sum(pq.read_metadata(out_dir / shard_name(k)).num_rows for k in range(n_shards))
    return VersionSummary(
        version=spec.name,
        task=cfg.task,
        out=str(out_dir),
        rows=rows,
        scored=scored,
        resumed_shards=n_shards - len({int(i["shard"]) for i in todo}),
        shards=n_shards,
        errors=n_errors,
        seconds=round(seconds, 3),
        rows_per_s=round(scored / seconds, 2) if seconds else 0.0,
        tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
        actors=sorted(actors),
    )


def duplicate_ids(task: Task, records: list[Record]) -> dict[int, str]:
    """Input index -> reason, for every record whose id an earlier record already has: a result
    set holds each id once (`muscle flips` joins on it), so the second one is quarantined."""
    first: dict[str, int] = {}
    out = {}
    for k, rec in enumerate(records):
        try:
            id_ = task.parse(rec).id
        except BadRow:
            continue  # quarantined by the actor, with its own reason
        if id_ in first:
            out[k] = f"duplicate id {id_!r}, first seen at row {first[id_]}"
        else:
            first[id_] = rec.row
    return out


def run_score(cfg: ScoreConfig, log=print, progress=None) -> list[VersionSummary]:
    """Score every version on the task; returns (and writes to OUT/summary.json) one summary each.

    `progress(n)`, if given, is called on the driver as each scored row comes back. One run at
    a time writes to an OUT (`out_lock`); a second one is refused.
    """
    with out_lock(cfg.out, log=log):
        return _run_score(cfg, log, progress)


def _run_score(cfg: ScoreConfig, log, progress) -> list[VersionSummary]:
    from muscle_ray.models import check_same_tokenizer
    from muscle_ray.runtime import init_ray

    task = get_task(cfg.task, **cfg.task_options)
    versions = [v.model_version() for v in cfg.versions]  # checks the directories up front
    if len(versions) > 1:
        try:
            check_same_tokenizer(versions)
        except MuscleError as e:
            log(f"warning: {e} (predictions are still comparable; token-level comparisons are not)")
    if cfg.chat_template:  # refused here, in one line, rather than by every actor
        from muscle_ray.chat import require_chat_template
        from muscle_ray.models import load_tokenizer

        for v in versions:
            require_chat_template(load_tokenizer(v))
    if cfg.backend == "vllm":
        from muscle_ray.vllm_support import require_vllm

        require_vllm()
    data = cfg.data_path(task.default_path)
    records = _load_records(task, data, cfg.limit)
    if not records:
        raise MuscleError(f"{data}: no records to score")
    skip = duplicate_ids(task, records)
    init_ray()
    summaries = []
    for spec in cfg.versions:
        s = score_version(cfg, spec, records, data, log=log, progress=progress, skip=skip)
        summaries.append(s)
        if s.rows == 0 and s.errors:  # every row failed: a broken model or backend, not bad rows
            first = pq.read_table(Path(s.out) / ERRORS_FILE).column("reason")[0].as_py()
            raise MuscleError(
                f"{Path(s.out) / ERRORS_FILE}: none of the {s.errors} rows could be scored (the first: {first})"
            )
        log(
            f"[{s.version}/{s.task}] {s.rows} rows in {s.out} ({s.scored} scored now, "
            f"{s.resumed_shards}/{s.shards} shards resumed, {s.errors} bad rows skipped); "
            f"{s.rows_per_s} rows/s, {s.tokens_per_s} tokens/s"
        )
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=1))
    return summaries
