"""Shadow-mode bookkeeping: disagreements to Parquet in batches, agreements and flips counted.

Each gateway replica owns one `ShadowLog`. Rows wait in memory and go out as one Parquet file
per batch (`flush_rows` rows, or fewer once the oldest has waited `flush_seconds`), written to a
temporary name and renamed, so a reader (`pyarrow.dataset`, Ray Data) never sees half a file.
Counts go to Ray Serve's Prometheus metrics and to a plain dict the gateway reports at
`/v1/stats`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

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

        self._metric = ServeCounter(name, description=description, tag_keys=("old", "new", "outcome"))
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

    def add(self, row: dict) -> Path | None:
        """Keep one disagreement; write the batch when it is full. Returns the file written."""
        with self._lock:
            self._rows.append({k: row.get(k) for k in SCHEMA_FIELDS})
            self._oldest = self._oldest or time.monotonic()
        return self.flush() if len(self._rows) >= self.flush_rows else None

    def due(self) -> bool:
        return self._oldest is not None and time.monotonic() - self._oldest >= self.flush_seconds

    def flush(self) -> Path | None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._lock:
            rows, self._rows, self._oldest = self._rows, [], None
            if not rows:
                return None
            self._seq += 1
            path = self.out / f"{self._prefix}-{self._seq:06d}.parquet"
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), tmp)
        os.replace(tmp, path)
        self.files.append(path)
        return path

    @property
    def pending(self) -> int:
        return len(self._rows)
