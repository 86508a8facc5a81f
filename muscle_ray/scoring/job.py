"""The batch-inference job: a task's records -> input shards -> Ray Data -> an actor pool of
scorers -> result shards.

The driver holds no records: a Ray task streams the input file into input shards
(`scoring.inputs`, OUT/_input/<task>), Ray Data feeds them to the pool, and the driver only
collects each shard's result rows until the shard is complete, so its memory does not grow
with the input (bench/bench_score_stream.py measures it).

Layout of the output (one results set per version and task, readable by `read_results`)::

    OUT/<version>/<task>/shard-00000.parquet     results format, input rows [0, S), then [S, 2S), ...
    OUT/<version>/<task>/errors.parquet          rows quarantined: row, reason, raw (unparsable, too
                                                 long for the model, a duplicate id, ...)
    OUT/<version>/<task>/_run.json               what produced the shards (checked on resume)
    OUT/summary.json                             rows, rows/s, tokens/s, errors per version
    OUT/_input/<task>/                           the input shards (`scoring.inputs`), reused on resume
    OUT/.lock                                    held while a run writes here (see out_lock.py)

A shard is a fixed slice of the input (S = shard_size rows), written atomically when its last
row comes back, so a rerun into the same OUT skips finished shards and the final table is the
same as an uninterrupted run's. Within a shard rows keep input order.

Versions on one base (`backend.group_versions`: the demo's compat, control and snapshots are
LoRA adapters of one base) score in ONE pass: each actor loads the base once with all their
adapters and scores every batch with each version, so a pool starts once per base, not once per
version. A row goes through the pass if its shard is missing for any of them; each version's
shards, errors and `_run.json` stay its own. On the vllm backend a generative task's pass runs
through Ray Data LLM's engines instead of our pool (`vllm_batch`): one part per (row, version)
comes back, and the collector puts a shard's parts together before writing it.

Determinism: each MC question is one packed sequence whose log-likelihoods do not depend on
the other questions mathematically, but float32 GEMMs can differ in the last bits with the batch
shape. Predictions are argmaxes over options that differ by far more than that, so they agree
across batch sizes and worker counts (tests/test_score_job.py varies both); log-likelihoods
agree to ~1e-5.
"""

from __future__ import annotations

import json
import pickle
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.out_lock import out_lock
from muscle_ray.results import ERRORS_FILE, write_atomic
from muscle_ray.scoring.config import ScoreConfig, VersionSpec
from muscle_ray.scoring.inputs import Inputs, duplicate_ids, prepare_inputs
from muscle_ray.scoring.rows import ERROR_SCHEMA, raw_text, to_table
from muscle_ray.scoring.vllm_batch import generation_pass, through_processor
from muscle_ray.tasks.base import Instance, Record, get_task

__all__ = ["ScoreActor", "VersionSummary", "duplicate_ids", "run_score", "score_group", "score_version"]

if TYPE_CHECKING:  # the backends load torch; the actor imports them when it starts
    from muscle_ray.scoring.backend import Backend, Scorer


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def _errors_name(k: int) -> str:
    return f"_shard-{k:05d}.errors.parquet"  # "_" hides it from results readers


class ScoreActor:
    """The model versions of one group in memory (`backend.VersionGroup`: one base, its
    adapters); parses each input row's record once and scores the good ones with every version
    its row needs (`need`: input shard -> one "1"/"0" per version, "1" where that version's shard
    is missing). Per row out: its input index and row, JSON lists, one entry per version, of the
    result row (None when not scored) and of the reason it failed ("" when it did not), and the
    record's text where it failed (errors.parquet's `raw`; "" otherwise)."""

    def __init__(
        self,
        versions: list[dict],
        task: str,
        task_options: dict,
        backend: Backend,
        batch_size: int,
        threads: int,
        chat_template: bool = False,
        need: dict[int, str] | None = None,
        shard_size: int = 1,
        backend_options: dict | None = None,
    ):
        import ray
        import torch

        from muscle_ray.scoring.backend import VersionGroup

        torch.set_num_threads(threads)
        self.actor_id = ray.get_runtime_context().get_actor_id()  # which pool actor scored a row
        specs = [VersionSpec(**v) for v in versions]
        self.names = [s.name for s in specs]
        self.task = get_task(task, **task_options)
        self.need, self.shard_size = need or {}, shard_size
        self.models = VersionGroup(
            backend,
            [s.model_version() for s in specs],
            batch_size,
            chat_template=chat_template,
            **(backend_options or {}),  # checked per backend by the config (`check_backend_options`)
        )

    def __call__(self, batch: dict) -> dict:
        n, V = len(batch["ord"]), len(self.names)
        results: list[list[dict | None]] = [[None] * V for _ in range(n)]
        errors = [[str(e)] * V for e in batch["error"]]  # duplicate ids come marked already
        need = [self.need[int(i) // self.shard_size] for i in batch["ord"]]
        records: list[Record] = [pickle.loads(blob) for blob in batch["record"]]
        good = []
        for i, record in enumerate(records):
            if errors[i][0]:
                continue
            try:
                good.append((i, (record.row, self.task.parse(record))))
            except BadRow as e:
                errors[i] = [e.reason] * V
        for j, name in enumerate(self.names):
            mine = [(i, item) for i, item in good if need[i][j] == "1"]
            if not mine:
                continue
            with self.models.using(name) as scorer:
                for (i, _), (result, error) in zip(mine, self._score(scorer, name, [item for _, item in mine])):
                    results[i][j], errors[i][j] = result, error
        return {
            "ord": batch["ord"],
            "row": batch["row"],
            "results": [json.dumps(r) for r in results],
            "errors": [json.dumps(e) for e in errors],
            "raw": [raw_text(rec) if any(e) else "" for rec, e in zip(records, errors)],
            "actor": [self.actor_id] * n,
        }

    def _score(self, scorer: Scorer, name: str, items: list[tuple[int, Instance]]) -> list[tuple[dict | None, str]]:
        """(result row, "") or (None, why it failed) for each (row, Instance).

        A batch that fails is retried one row at a time, so a bad row (a continuation longer than
        the model's context, ...) costs only itself. A MuscleError that is not a BadRow is a
        setting, wrong for every row, and stops the job.
        """
        from muscle_ray.scoring.backend import score_instances

        if not items:
            return []
        try:
            return [(r, "") for r in score_instances(scorer, self.task, items, name)]
        except MuscleError as e:
            if not isinstance(e, BadRow):
                raise
            if len(items) == 1:
                return [(None, e.reason)]
        except Exception as e:
            if len(items) == 1:
                return [(None, f"scoring failed: {type(e).__name__}: {' '.join(str(e).split())[:500]}")]
        return [self._score(scorer, name, [item])[0] for item in items]


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


@dataclass
class _Target:
    """One version of a group in a pass: its output directory and the shards it has and gets."""

    spec: VersionSpec
    dir: Path
    done: set[int]  # shards on disk
    resumed: int  # of them, found on disk when the pass started
    old_errors: int  # bad rows in the resumed shards
    scored: int = 0
    tokens: int = 0
    new_errors: int = 0
    actors: set[str] = field(default_factory=set)


def _target(cfg: ScoreConfig, spec: VersionSpec, inputs: Inputs, data: str, log) -> _Target:
    """Check OUT/<version>/<task> belongs to this run, clear what a killed writer left, and see
    which shards are finished."""
    out_dir = Path(cfg.out) / spec.name / cfg.task
    S = cfg.shard_size
    n_shards = inputs.n_shards
    _check_run(
        out_dir,
        {
            "task": cfg.task,
            "task_options": cfg.task_options,
            "data": str(Path(data).resolve()),
            "limit": cfg.limit,
            "shard_size": S,
            "records": inputs.records,
            "backend": cfg.backend,
            "chat_template": cfg.chat_template or None,  # null when off, as in runs from before the field
            "base": str(Path(spec.base).resolve()),
            "adapter": spec.adapter and str(Path(spec.adapter).resolve()),
        },
    )
    for stale in out_dir.glob(".*.tmp"):  # a writer killed mid-write left its temp file behind
        stale.unlink(missing_ok=True)
    done = {k for k in range(n_shards) if (out_dir / shard_name(k)).exists()}
    if done:
        log(f"[{spec.name}/{cfg.task}] resuming: {len(done)}/{n_shards} shards already done")
    old_errors = sum(
        pq.read_metadata(f).num_rows for f in out_dir.glob("_shard-*.errors.parquet") if int(f.name[7:12]) in done
    )
    return _Target(spec, out_dir, done, len(done), old_errors)


def score_version(
    cfg: ScoreConfig, spec: VersionSpec, inputs: Inputs, data: str, log=print, progress=None
) -> VersionSummary:
    """Score one version into OUT/<version>/<task> (`score_group` with one version)."""
    return score_group(cfg, [spec], inputs, data, log=log, progress=progress)[0]


def score_group(
    cfg: ScoreConfig, specs: list[VersionSpec], inputs: Inputs, data: str, log=print, progress=None
) -> list[VersionSummary]:
    """Score versions that one actor can hold together (`backend.group_versions`) in ONE Ray Data
    pass over the input shards (`prepare_inputs`), each into OUT/<version>/<task>.

    A row goes through the pool if its shard is missing for any version, and is scored only for
    those; each version's missing shards are written as their rows come back, finished ones are
    never rewritten. A summary's `seconds` is the whole pass's (its versions share it).
    """
    if cfg.workers is None or cfg.cpus_per_worker is None:  # a config `resolve_placement` has not sized
        raise MuscleError("score_group: the pool is not sized (workers, cpus_per_worker); call resolve_placement")
    n_shards = inputs.n_shards
    targets = [_target(cfg, spec, inputs, data, log) for spec in specs]
    todo_shards = [k for k in range(n_shards) if any(k not in t.done for t in targets)]
    active = [t for t in targets if len(t.done) < n_shards]  # the versions the actors load
    need = {k: "".join("0" if k in t.done else "1" for t in active) for k in todo_shards}
    start = time.perf_counter()
    if todo_shards:
        expected = {k: inputs.rows_in(k) for k in todo_shards}
        lo, hi = cfg.workers
        rows = _read_inputs(_pieces(inputs, todo_shards, cfg.batch_size * 4, hi))
        per_version = through_processor(cfg.backend, get_task(cfg.task, **cfg.task_options).kind)
        if per_version:  # one part per (row, version), from Ray Data LLM's engines
            ds = generation_pass(cfg, [t.spec for t in active], rows, need)
            expected = {k: n * need[k].count("1") for k, n in expected.items()}
        else:  # one part per row, every version it needs scored by one actor
            ds = _pool_pass(cfg, active, rows, need)
        pending: dict[int, list[dict]] = {}
        for out in _rows(ds):
            k = int(out["ord"]) // cfg.shard_size
            if progress:
                for _ in range(1 if per_version else need[k].count("1")):
                    progress(1)  # one more (row, version) back
            pending.setdefault(k, []).append(out)
            if len(pending[k]) < expected[k]:
                continue
            rows_k = _merge(pending.pop(k))
            for j, t in enumerate(active):
                if need[k][j] == "1":
                    _write_shard(cfg, t, k, n_shards, [(row, raw, r[j], e[j], a) for row, raw, r, e, a in rows_k], log)
    summaries = []
    seconds = time.perf_counter() - start
    for t in targets:
        n_errors = _write_errors(t.dir)
        if cfg.max_errors is not None and n_errors > cfg.max_errors:
            raise MuscleError(f"{t.dir / ERRORS_FILE}: {n_errors} bad rows, more than --max-errors {cfg.max_errors}")
        summaries.append(
            VersionSummary(
                version=t.spec.name,
                task=cfg.task,
                out=str(t.dir),
                rows=sum(pq.read_metadata(t.dir / shard_name(k)).num_rows for k in range(n_shards)),
                scored=t.scored,
                resumed_shards=t.resumed,
                shards=n_shards,
                errors=n_errors,
                seconds=round(seconds, 3),
                rows_per_s=round(t.scored / seconds, 2) if seconds else 0.0,
                tokens_per_s=round(t.tokens / seconds, 1) if seconds else 0.0,
                actors=sorted(t.actors),
            )
        )
    return summaries


def _pool_pass(cfg: ScoreConfig, active: list[_Target], rows, need: dict[int, str]):
    """The input rows through a pool of `ScoreActor`s: one output row per input row."""
    import ray

    from muscle_ray.scoring.placement import torch_threads

    lo, hi = cfg.workers  # type: ignore[misc]  # sized by resolve_placement
    pool = ray.data.ActorPoolStrategy(size=lo) if lo == hi else ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)
    return rows.map_batches(
        ScoreActor,
        fn_constructor_kwargs=dict(
            versions=[t.spec.model_dump() for t in active],
            task=cfg.task,
            task_options=cfg.task_options,
            backend=cfg.backend,
            batch_size=cfg.batch_size,
            threads=torch_threads(cfg.cpus_per_worker or 1),
            chat_template=cfg.chat_template,
            need=need,
            shard_size=cfg.shard_size,
            backend_options=cfg.backend_options,
        ),
        batch_size=cfg.batch_size * 4,
        compute=pool,
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker or None,
    )


def _merge(parts: list[dict]) -> list[tuple]:
    """A shard's parts as (row, raw, results, errors, actor) per input row, in input order: a
    row that came back in several parts (one per version) gets each version's entry from its part."""
    rows: dict[int, tuple] = {}
    for o in parts:
        i, results, errors = int(o["ord"]), json.loads(o["results"]), json.loads(o["errors"])
        if i not in rows:
            rows[i] = (int(o["row"]), o["raw"], results, errors, o["actor"])
            continue
        row, raw, have_r, have_e, actor = rows[i]
        for j, (r, e) in enumerate(zip(results, errors)):
            have_r[j] = have_r[j] if r is None else r
            have_e[j] = have_e[j] or e
        rows[i] = (row, raw or o["raw"], have_r, have_e, actor)
    return [rows[i] for i in sorted(rows)]


def _pieces(inputs: Inputs, shards: list[int], rows: int, actors: int) -> list[dict]:
    """(file, start, stop) slices of the input shards, one Ray Data block each: a whole shard
    when there are many shards, else each cut into pieces of at least `rows` so that about four
    pieces per actor keep every actor of the pool busy (200 rows in one shard would otherwise go
    to one actor whole). Not `Dataset.repartition`: its task asks a whole CPU, which a pool that
    fills the machine never leaves free."""
    per_shard = max(1, -(-4 * actors // max(1, len(shards))))
    out = []
    for f, k in zip(inputs.files(shards), shards):
        n = inputs.rows_in(k)
        cut = max(1, min(per_shard, n // rows))
        bounds = [n * i // cut for i in range(cut + 1)]
        out += [{"file": f, "start": a, "stop": b} for a, b in zip(bounds, bounds[1:])]
    return out


def _read_input(batch):
    """Slices of input shard files -> their rows (`runtime.read_slices`, in a task on the
    driver's node: they are its local files)."""
    from muscle_ray.runtime import read_slices

    return read_slices(batch)


def _read_inputs(pieces: list[dict]):
    """A Dataset of the input rows, one block per piece (`_pieces`), read on this node
    (`runtime.read_here`)."""
    from muscle_ray.runtime import read_here

    return read_here(pieces, _read_input)


def _rows(ds):
    """The pass's output rows. A MuscleError raised in an actor (a setting wrong for every row,
    an adapter that does not load) comes out as a MuscleError with its own one-line message:
    Ray wraps it, and an error in an actor's constructor reaches here only as text."""
    try:
        yield from ds.iter_rows()
    except Exception as e:
        message = _muscle_error(e)
        if message is None:
            raise
        raise MuscleError(message) from e


def _muscle_error(e: BaseException) -> str | None:
    seen: BaseException | None = e
    while seen is not None:
        cause = getattr(seen, "cause", None)  # RayTaskError keeps the actor's exception
        if isinstance(cause, MuscleError):
            return str(cause)
        if isinstance(seen, MuscleError) and "Traceback" not in str(seen):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    found = re.findall(r"^\s*muscle_ray\.errors\.\w+: (.+)$", str(e), flags=re.M)
    return found[-1] if found else None


def _write_shard(cfg: ScoreConfig, t: _Target, k: int, n_shards: int, rows: list, log) -> None:
    """Shard k of one version from its (row, raw text, result or None, error, actor) rows, in
    input order: the results file, and the bad rows beside it; then the --max-errors check."""
    results = [r for _, _, r, _, _ in rows if r is not None]
    bad = [{"row": row, "reason": e, "raw": raw} for row, raw, _, e, _ in rows if e]
    if bad:
        write_atomic(pa.Table.from_pylist(bad, schema=ERROR_SCHEMA), t.dir / _errors_name(k))
    write_atomic(to_table(results), t.dir / shard_name(k))
    t.done.add(k)
    t.scored += len(results)
    t.tokens += sum(r["n_tokens"] for r in results)
    t.new_errors += len(bad)
    t.actors.update(a for *_, a in rows)
    log(
        f"[{t.spec.name}/{cfg.task}] shard {k + 1}/{n_shards} written: {len(results)} rows"
        + (f", {len(bad)} bad" if bad else "")
        + f" ({len(t.done)}/{n_shards} done)"
    )
    if cfg.max_errors is not None and t.old_errors + t.new_errors > cfg.max_errors:
        _write_errors(t.dir)
        raise MuscleError(
            f"{t.dir / ERRORS_FILE}: {t.old_errors + t.new_errors} bad rows so far, "
            f"more than --max-errors {cfg.max_errors}"
        )


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
    from muscle_ray.scoring.backend import group_versions
    from muscle_ray.scoring.placement import resolve_placement

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
    if not Path(data).exists():
        raise MuscleError(f"{data}: no such file (input of task {task.name})")
    # checks every adapter directory first
    groups = group_versions(cfg.backend, versions, through_processor(cfg.backend, task.kind))
    init_ray()
    cfg = resolve_placement(cfg, log)
    inputs = prepare_inputs(cfg.task, cfg.task_options, data, cfg.out, cfg.limit, cfg.shard_size, log=log)
    if not inputs.records:
        raise MuscleError(f"{data}: no records to score")
    done: dict[str, VersionSummary] = {}
    for group in groups:
        specs = [cfg.versions[i] for i in group]
        if len(specs) > 1:
            log(f"[{cfg.task}] {', '.join(s.name for s in specs)}: one pass, one base ({versions[group[0]].base})")
        for s in score_group(cfg, specs, inputs, data, log=log, progress=progress):
            done[s.version] = s
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
    summaries = [done[v.name] for v in cfg.versions]
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "summary.json").write_text(json.dumps([asdict(s) for s in summaries], indent=1))
    return summaries
