"""JSON Lines result sets: rows of the results format, or lm-evaluation-harness sample logs.

lm-eval's `--log_samples` files (`samples_<task>_<date>.jsonl`) are mapped into the results
format, so runs people already have give flip metrics without rescoring.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from muscle_ray.errors import MuscleError
from muscle_ray.schema import MC_COLUMNS, REQUIRED

LMEVAL_FIELDS = ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics")
_LMEVAL_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[\d\-.]+)$")


def read_jsonl(path: Path, metric: str | None = None, filter: str | None = None) -> pa.Table:
    """One JSON object a line; lm-eval sample logs are recognised by their `doc_id`/`filtered_resps`."""
    records = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MuscleError(f"{path}: line {line_no} is not UTF-8 (byte {e.start}: {e.reason})") from None
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
    listed = records[0][1]["metrics"]
    listed = [m for m in listed if isinstance(m, str)] if isinstance(listed, list) else []
    metric = metric or next((m for m in ("acc", "exact_match") if m in listed), listed[0] if listed else None)
    if metric is None:
        raise MuscleError(f"{path}: lm-eval samples list no metrics")

    cols: dict[str, list] = {
        k: []
        for k in ("id", "prediction", "reference", "score", "choice_logliks", "choice_chars", "doc_hash", "prompt_hash")
    }
    multiple_choice = _is_loglikelihood(first)
    for line_no, rec in records:
        try:
            row = _sample_row(rec, metric, multiple_choice, path, line_no)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            kind = "loglikelihood" if multiple_choice else "generation"
            raise MuscleError(
                f"{path}: line {line_no}: not an lm-eval {kind} sample ({type(e).__name__}: {e})"
            ) from None
        for k, v in row.items():
            cols[k].append(v)
    score = np.array(cols["score"], dtype=np.float64)
    binary = bool(np.isin(score[np.isfinite(score)], (0.0, 1.0)).all())
    n = len(score)
    table = {
        "id": pa.array(cols["id"], pa.string()),
        "task": pa.array([lmeval_task_name(path)] * n, pa.string()),
        "correct": pa.array(score == 1.0 if binary else [None] * n, pa.bool_()),
        "score": pa.array(score, pa.float64()),
        "prediction": pa.array(cols["prediction"], pa.string()),
        "reference": pa.array(cols["reference"], pa.string()),
    }
    if multiple_choice:
        table["choice_logliks"] = pa.array(cols["choice_logliks"], MC_COLUMNS["choice_logliks"])
        table["choice_chars"] = pa.array(cols["choice_chars"], MC_COLUMNS["choice_chars"])
    for key in ("doc_hash", "prompt_hash"):  # provenance lm-eval writes; kept when it is text
        table[key] = pa.array([h if isinstance(h, str) else None for h in cols[key]], pa.string())
    return pa.table(table)


def _sample_row(rec: dict, metric: str, multiple_choice: bool, path: Path, line_no: int) -> dict:
    """One lm-eval sample line as a results row; MuscleError names what is wrong with it."""
    value = rec.get(metric)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)):
        raise MuscleError(f"{path}: line {line_no}: column '{metric}' is {value!r}, not a number")
    row = {
        "id": str(rec["doc_id"]),
        "score": float(value),
        "doc_hash": rec.get("doc_hash"),
        "prompt_hash": rec.get("prompt_hash"),
    }
    if not multiple_choice:
        fr = rec["filtered_resps"]
        return {**row, "prediction": str(fr[0] if isinstance(fr, list) and fr else fr), "reference": str(rec["target"])}
    try:
        ll = [float(r[0]) for r in rec["filtered_resps"]]
    except (TypeError, ValueError, KeyError, IndexError):
        raise MuscleError(
            f"{path}: line {line_no}: column 'filtered_resps' is not a list of [loglik, is_greedy]"
        ) from None
    conts = _continuations(rec["arguments"], path, line_no)
    if len(conts) != len(ll):
        raise MuscleError(
            f"{path}: line {line_no}: {len(ll)} answers in 'filtered_resps' for {len(conts)} options in 'arguments'"
        )
    n = [len(c[1:] if c.startswith(" ") else c) for c in conts]
    key = np.array(ll) / np.maximum(np.array(n, dtype=float), 1.0) if metric == "acc_norm" else np.array(ll)
    return {
        **row,
        "choice_logliks": ll,
        "choice_chars": n,
        "prediction": str(int(np.argmax(key))),
        "reference": _gold_index(rec["target"], conts),
    }


def _continuations(arguments, path: Path, line_no: int) -> list[str]:
    """Each option's continuation: lm-eval 0.4 logs {gen_args_i: {arg_0, arg_1}}; older logs a
    list of [context, continuation] pairs."""
    items = arguments.values() if isinstance(arguments, dict) else arguments
    try:
        conts = [a["arg_1"] if isinstance(a, dict) else a[1] for a in items]
    except (TypeError, KeyError, IndexError):
        conts = None
    if not conts or not all(isinstance(c, str) for c in conts):
        raise MuscleError(f"{path}: line {line_no}: column 'arguments' holds no (context, continuation) pairs")
    return conts


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
