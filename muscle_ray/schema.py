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

import pyarrow as pa

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
