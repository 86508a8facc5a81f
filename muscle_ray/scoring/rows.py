"""Turning a backend's raw outputs into results-format rows (see `muscle_ray.results`).

Besides the contract's columns every row keeps `acc_norm`'s pick (`pred_norm`,
`correct_norm`: the argmax of loglik / len(choice) in characters, lm-eval's acc_norm), the
input `row`, the model version's name and `n_tokens` (tokens run through the model).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from muscle_ray.schema import SCHEMA
from muscle_ray.tasks.base import Instance, Record, Task

EXTRA = [
    pa.field("pred_norm", pa.int64()),
    pa.field("correct_norm", pa.bool_()),
    pa.field("generation", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("version", pa.string()),
    pa.field("n_tokens", pa.int64()),
]
RESULT_SCHEMA = pa.schema(list(SCHEMA) + EXTRA)
ERROR_SCHEMA = pa.schema([pa.field("row", pa.int64()), pa.field("reason", pa.string()), pa.field("raw", pa.string())])


def mc_row(inst: Instance, logliks: list[float], version: str, n_tokens: int, row: int) -> dict:
    """acc: the highest log-likelihood; acc_norm: highest per character. Ties go to the first."""
    ll = np.asarray(logliks, dtype=np.float64)
    pred = int(np.argmax(ll))
    pred_norm = int(np.argmax(ll / np.asarray(inst.choice_chars, dtype=np.float64)))
    correct = pred == inst.label
    return {
        "id": inst.id,
        "task": inst.task,
        "correct": correct,
        "score": float(correct),
        "prediction": str(pred),
        "reference": inst.reference or str(inst.label),
        "choice_logliks": [float(x) for x in ll],
        "choice_chars": list(inst.choice_chars),
        "pred_norm": pred_norm,
        "correct_norm": pred_norm == inst.label,
        "generation": None,
        "row": row,
        "version": version,
        "n_tokens": n_tokens,
    }


def gen_row(task: Task, inst: Instance, text: str, version: str, n_tokens: int, row: int) -> dict:
    correct, score, prediction = task.score_generation(inst, text)
    return {
        "id": inst.id,
        "task": inst.task,
        "correct": correct,
        "score": float(score),
        "prediction": prediction,
        "reference": inst.reference,
        "choice_logliks": None,
        "choice_chars": None,
        "pred_norm": None,
        "correct_norm": None,
        "generation": text,
        "row": row,
        "version": version,
        "n_tokens": n_tokens,
    }


def raw_text(record: Record) -> str:
    """The record's text as valid UTF-8 (errors.parquet's `raw`; a file may hold undecodable
    bytes, which Arrow refuses)."""
    return record.text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
