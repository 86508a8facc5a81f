"""Shadow mode: the twin model answers the same prompts in the background; disagreements are kept.

Each gateway replica owns one `ShadowRecorder`. It compares the served answers with the twin's
after the client has its answer, counts agree/disagree/error per model pair (`OutcomeCounter`:
Ray Serve's Prometheus metrics and a dict for `/v1/stats`), and hands disagreements to a
`ShadowLog`.

The log keeps rows durable as they arrive: each row is appended at once to the replica's
journal (JSONL under `out/.journal/`, fsync'd every second), so a replica killed outright
(SIGKILL) loses no row it recorded, and a machine crash at most the last second. The journal
is compacted into one Parquet file per batch (`flush_rows` rows, or fewer once the oldest has
waited `flush_seconds`, and at shutdown), written to a temporary name and renamed, so a reader
(`pyarrow.dataset`, Ray Data) never sees half a file. A new log compacts the journal a dead
process left. A failed write keeps the rows for the next try.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import IO, cast

from muscle_ray.metrics.text import exact_match, rouge

logger = logging.getLogger(__name__)

SCHEMA_FIELDS = ("ts", "pair", "model", "shadow_model", "prompt", "output", "shadow_output", "rougeL")
JOURNAL = ".journal"  # hidden: dataset readers skip names starting with "." or "_"


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("ts", pa.timestamp("ms", tz="UTC")),
            ("pair", pa.string()),
            ("model", pa.string()),
            ("shadow_model", pa.string()),
            ("prompt", pa.string()),
            ("output", pa.string()),
            ("shadow_output", pa.string()),
            ("rougeL", pa.float64()),
        ]
    )


class OutcomeCounter:
    """Outcomes per model pair, in Prometheus (through Ray Serve's metrics) and in memory."""

    def __init__(self, name: str, description: str):
        from ray.serve.metrics import Counter as ServeCounter

        tags = cast(tuple[str], ("old", "new", "outcome"))  # Ray annotates tag_keys as a 1-tuple
        self._metric = ServeCounter(name, description=description, tag_keys=tags)
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def inc(self, old: str, new: str, outcome: str) -> None:
        self._metric.inc(1, tags={"old": old, "new": new, "outcome": outcome})
        self.counts[(old, new, outcome)] += 1

    def as_list(self) -> list[dict]:
        return [{"old": o, "new": n, "outcome": k, "count": c} for (o, n, k), c in sorted(self.counts.items())]


def _line(row: dict) -> str:
    ts = row.get("ts") or dt.datetime.now(dt.timezone.utc)
    return json.dumps({**{k: row.get(k) for k in SCHEMA_FIELDS}, "ts": ts.isoformat()}, ensure_ascii=False) + "\n"


def _read_segment(path: Path) -> list[dict]:
    """A journal segment's rows; a torn last line (the writer killed mid-write) is skipped."""
    rows = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("shadow mode: %s line %d is not a whole row; skipped", path, n)
                continue
            rows.append({**row, "ts": dt.datetime.fromisoformat(row["ts"])})
    return rows


def compact(segment: Path, out: Path) -> Path | None:
    """A journal segment as one Parquet file of the same name (None when it held no row), then
    the segment deleted. Idempotent: a segment whose file exists was compacted already."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = out / f"{segment.stem}.parquet"
    if not target.exists():
        rows = _read_segment(segment) if segment.exists() else []
        if rows:
            tmp = out / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    written = target if target.exists() else None
    segment.unlink(missing_ok=True)
    return written


class ShadowLog:
    """Disagreement rows: journaled as they come, compacted into Parquet batches by `flush()`.

    A journal segment is locked (flock) by the process appending to it, and the lock dies with
    the process, so any segment a new log can lock belongs to nobody: it is compacted at once.
    """

    def __init__(self, out: str | Path, flush_rows: int = 64, flush_seconds: float = 10.0):
        self.out = Path(out)
        self.journal = self.out / JOURNAL
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._prefix = f"shadow-{uuid.uuid4().hex[:8]}"  # one writer per replica: no name clashes
        self._seq = 0
        self._lock = threading.Lock()
        self._backlog: list[str] = []  # rows the journal could not take yet (disk trouble)
        self._segment: IO[str] | None = None  # the segment being appended to (locked)
        self._segment_path = Path()
        self._rows = 0  # ... its rows
        self._oldest: float | None = None  # ... and when the first came
        self._finished: dict[Path, int] = {}  # segments waiting for compaction -> rows
        self.files: list[Path] = []
        self.files += self.recover()

    # -- appending ---------------------------------------------------------------------------
    def add(self, row: dict) -> None:
        """Journal a row now (written through to the OS). If the disk refuses, the row is held
        in memory and the next `add`/`flush` tries again; `flush` raises the error."""
        with self._lock:
            self._backlog.append(_line(row))
            with contextlib.suppress(OSError):
                self._drain()

    def _drain(self) -> None:
        if not self._backlog:
            return
        if self._segment is None:
            self._segment, self._segment_path = self._open_segment()
        self._segment.write("".join(self._backlog))
        self._segment.flush()
        self._rows += len(self._backlog)
        self._oldest = self._oldest or time.monotonic()
        self._backlog = []

    def _open_segment(self) -> tuple[IO[str], Path]:
        """A new segment, locked before it gets its name, so no other log ever sees it unlocked."""
        self.journal.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = self.journal / f"{self._prefix}-{self._seq:06d}.jsonl"
        tmp = path.with_name(f".{path.name}.new")
        f = tmp.open("a", encoding="utf-8")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, path)
        return f, path

    def sync(self) -> None:
        """fsync the segment being appended to (the recorder calls this every second)."""
        with self._lock:
            if self._segment is None:
                return
            fd = os.dup(self._segment.fileno())  # synced outside the lock: add() never waits on the disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def due(self) -> bool:
        """A batch is full, the oldest row has waited `flush_seconds`, or earlier rows wait for a retry."""
        with self._lock:
            return (
                bool(self._backlog or self._finished)
                or self._rows >= self.flush_rows
                or (self._oldest is not None and time.monotonic() - self._oldest >= self.flush_seconds)
            )

    # -- compacting --------------------------------------------------------------------------
    def flush(self) -> Path | None:
        """Compact the rows journaled so far into Parquet (one file per segment; the last one is
        returned, None when there were no rows). On failure the rows stay, ahead of any added
        meanwhile, and the error is raised."""
        with self._lock:
            self._drain()
            if self._segment is not None:
                os.fsync(self._segment.fileno())
                self._segment.close()  # unlocked: from now on anybody may compact it
                self._finished[self._segment_path] = self._rows
                self._segment, self._rows, self._oldest = None, 0, None
            finished = list(self._finished)
        written: Path | None = None
        for segment in finished:
            path = compact(segment, self.out)
            with self._lock:
                self._finished.pop(segment, None)
            if path is not None:
                self.files.append(path)
                written = path
        return written

    def recover(self) -> list[Path]:
        """Compact every journal segment no living process holds (a previous process's)."""
        if not self.journal.is_dir():
            return []
        written = []
        for segment in sorted(self.journal.glob("*.jsonl")):
            try:
                with segment.open("a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live writer's
                    path = compact(segment, self.out)
            except FileNotFoundError:  # compacted meanwhile by another log
                continue
            if path is not None:
                logger.warning("shadow mode: recovered %s from a journal a previous process left", path.name)
                written.append(path)
        return written

    @property
    def pending(self) -> int:
        """Rows not yet in a Parquet file."""
        with self._lock:
            return len(self._backlog) + self._rows + sum(self._finished.values())


class ShadowRecorder:
    """One gateway replica's shadow mode: compare in the background, flush on a timer and at shutdown."""

    def __init__(self, log: ShadowLog, counter: OutcomeCounter):
        self.log, self.counter = log, counter
        self._tasks: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None

    def record(self, model: str, twin: str, prompts: list[str], texts: list[str], twin_answers: list) -> None:
        """Compare `texts` (model's answers) with the twin's once they come, in the background:
        the client never waits for the shadow. `twin_answers` are awaitables of results with `.text`."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._compare(model, twin, prompts, texts, twin_answers))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop())

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("shadow mode: comparing with the twin failed: %r", task.exception())

    async def _compare(self, model: str, twin: str, prompts: list[str], texts: list[str], twin_answers: list) -> None:
        answers = await asyncio.gather(*twin_answers, return_exceptions=True)
        for prompt, text, answer in zip(prompts, texts, answers):
            if isinstance(answer, BaseException):
                self.counter.inc(twin, model, "error")
                logger.warning("shadow mode: %s did not answer a prompt sent to %s: %r", twin, model, answer)
                continue
            if bool(exact_match([text], [answer.text])[0]):
                self.counter.inc(twin, model, "agree")
                continue
            self.counter.inc(twin, model, "disagree")
            self.log.add(
                {
                    "ts": dt.datetime.now(dt.timezone.utc),
                    "pair": f"{twin}->{model}",
                    "model": model,
                    "shadow_model": twin,
                    "prompt": prompt,
                    "output": text,
                    "shadow_output": answer.text,
                    "rougeL": float(rouge([text], [answer.text], "rougeL")[0]),
                }
            )
        if self.log.due():
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        """Write the held rows; a failure is logged and the rows wait for the next try."""
        try:
            self.log.flush()
        except Exception as e:  # noqa: BLE001 - any write error: keep serving, retry next tick
            logger.warning(
                "shadow mode: writing %d rows to %s failed, retrying on the next tick: %r",
                self.log.pending,
                self.log.out,
                e,
            )

    def _tick(self) -> None:
        """Every second: the journal synced to disk, and a batch compacted when one is due."""
        try:
            self.log.sync()
        except OSError as e:
            logger.warning("shadow mode: syncing the journal under %s failed: %r", self.log.out, e)
        if self.log.due():
            self._flush()

    async def _flush_loop(self) -> None:
        tick = min(1.0, self.log.flush_seconds)
        while True:
            await asyncio.sleep(tick)
            await asyncio.to_thread(self._tick)

    async def close(self, wait_seconds: float = 10.0) -> None:
        """Write what is left: comparisons in flight get `wait_seconds` to finish, then one last flush."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_seconds)
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await asyncio.to_thread(self._flush)
