"""Shadow mode: the twin model answers the same prompts in the background; disagreements are kept.

Each gateway replica owns one `ShadowRecorder`. It compares the served answers with the twin's
after the client has its answer, counts agree/disagree/error per model pair (`OutcomeCounter`:
Ray Serve's Prometheus metrics and a dict for `/v1/stats`), and buffers disagreements in a
`ShadowLog`. The log goes out as one Parquet file per batch (`flush_rows` rows, or fewer once the
oldest has waited `flush_seconds`), written to a temporary name and renamed, so a reader
(`pyarrow.dataset`, Ray Data) never sees half a file. A failed write keeps the rows for the
next try, and the replica's shutdown writes what is still in memory (`close_recorders`, run by
the gateway app's lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import threading
import time
import uuid
import weakref
from collections import Counter
from pathlib import Path
from typing import cast

from muscle_ray.metrics.text import exact_match, rouge

logger = logging.getLogger(__name__)

SCHEMA_FIELDS = ("ts", "pair", "model", "shadow_model", "prompt", "output", "shadow_output", "rougeL")


def _schema():
    import pyarrow as pa

    return pa.schema([("ts", pa.timestamp("ms", tz="UTC")), ("pair", pa.string()), ("model", pa.string()),
                      ("shadow_model", pa.string()), ("prompt", pa.string()), ("output", pa.string()),
                      ("shadow_output", pa.string()), ("rougeL", pa.float64())])


class OutcomeCounter:
    """Outcomes per model pair, in Prometheus (through Ray Serve's metrics) and in memory."""

    def __init__(self, name: str, description: str):
        from ray.serve.metrics import Counter as ServeCounter

        tags = cast(tuple[str], ("old", "new", "outcome"))   # Ray annotates tag_keys as a 1-tuple
        self._metric = ServeCounter(name, description=description, tag_keys=tags)
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def inc(self, old: str, new: str, outcome: str) -> None:
        self._metric.inc(1, tags={"old": old, "new": new, "outcome": outcome})
        self.counts[(old, new, outcome)] += 1

    def as_list(self) -> list[dict]:
        return [{"old": o, "new": n, "outcome": k, "count": c} for (o, n, k), c in sorted(self.counts.items())]


class ShadowLog:
    """Buffered disagreement rows; `flush()` writes them as one Parquet file atomically."""

    def __init__(self, out: str | Path, flush_rows: int = 64, flush_seconds: float = 10.0):
        self.out = Path(out)
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._rows: list[dict] = []
        self._oldest: float | None = None
        self._prefix = f"shadow-{uuid.uuid4().hex[:8]}"   # one writer per replica: no name clashes
        self._seq = 0
        self._lock = threading.Lock()
        self.files: list[Path] = []

    def add(self, row: dict) -> None:
        with self._lock:
            self._rows.append({k: row.get(k) for k in SCHEMA_FIELDS})
            self._oldest = self._oldest or time.monotonic()

    def due(self) -> bool:
        """A batch is full, or the oldest row has waited `flush_seconds`."""
        with self._lock:
            return len(self._rows) >= self.flush_rows or (
                self._oldest is not None and time.monotonic() - self._oldest >= self.flush_seconds)

    def flush(self) -> Path | None:
        """Write the rows held as one file (None when there are none). If writing fails, the
        rows stay held, ahead of any added meanwhile, and the error is raised."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._lock:
            rows, oldest = self._rows, self._oldest
            self._rows, self._oldest = [], None
            if not rows:
                return None
            self._seq += 1
            path = self.out / f"{self._prefix}-{self._seq:06d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), tmp)
            os.replace(tmp, path)
        except BaseException:
            with self._lock:
                self._rows = rows + self._rows
                self._oldest = oldest
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        self.files.append(path)
        return path

    @property
    def pending(self) -> int:
        return len(self._rows)


_open_recorders: weakref.WeakSet[ShadowRecorder] = weakref.WeakSet()


class ShadowRecorder:
    """One gateway replica's shadow mode: compare in the background, flush on a timer and at shutdown."""

    def __init__(self, log: ShadowLog, counter: OutcomeCounter):
        self.log, self.counter = log, counter
        self._tasks: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None
        _open_recorders.add(self)

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
            self.log.add({"ts": dt.datetime.now(dt.timezone.utc), "pair": f"{twin}->{model}", "model": model,
                          "shadow_model": twin, "prompt": prompt, "output": text, "shadow_output": answer.text,
                          "rougeL": float(rouge([text], [answer.text], "rougeL")[0])})
        if self.log.due():
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        """Write the held rows; a failure is logged and the rows wait for the next try."""
        try:
            self.log.flush()
        except Exception as e:  # noqa: BLE001 - any write error: keep serving, retry next tick
            logger.warning("shadow mode: writing %d rows to %s failed, retrying on the next tick: %r",
                           self.log.pending, self.log.out, e)

    async def _flush_loop(self) -> None:
        tick = min(1.0, self.log.flush_seconds)
        while True:
            await asyncio.sleep(tick)
            if self.log.due():
                await asyncio.to_thread(self._flush)

    async def close(self, wait_seconds: float = 10.0) -> None:
        """Write what is left: comparisons in flight get `wait_seconds` to finish, then one last flush."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_seconds)
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await asyncio.to_thread(self._flush)
        _open_recorders.discard(self)


async def close_recorders() -> None:
    """Close every recorder of this process (a gateway replica runs in a process of its own)."""
    for recorder in list(_open_recorders):
        await recorder.close()
