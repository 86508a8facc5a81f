"""Compare result sets: old vs new, and optionally old vs new-compat (paper §2.4).

Which per-instance score S is used:
- no `metric`: S is the `score` column as the scorer wrote it, and the discrete metrics use
  the `correct` column (when it has no nulls in the joined rows);
- `metric="exact"`: S is recomputed as exact match of `prediction` vs `reference`, and
  correct = (S == 1);
- `metric` in rouge1/rouge2/rougeL/bertscore: S is recomputed from the text and the
  comparison is continuous only (no quadrants: there is no right or wrong).
So an explicit `--metric` always recomputes from text; the default trusts `score`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from muscle_ray.errors import MuscleError
from muscle_ray.metrics import flips
from muscle_ray.metrics.text import similarity

BASE_COLUMNS = ["id", "task", "correct", "score", "prediction"]


def columns_for(metric: str | None) -> list[str]:
    """Only the columns a comparison reads (result files carry many more)."""
    return BASE_COLUMNS + (["reference"] if metric else [])


@dataclass
class Comparison:
    paired: flips.Paired
    s_old: np.ndarray
    s_new: np.ndarray
    correct_old: np.ndarray | None
    correct_new: np.ndarray | None
    summary: dict
    epsilon: float

    def flip_table(self) -> pa.Table:
        """One row per joined instance: both sides' answers and scores, D, and its flip class."""
        p = self.paired
        pred_old, pred_new = _strings(p, "old", "prediction"), _strings(p, "new", "prediction")
        cols = {
            "id": p.old_column("id"),
            "prediction_old": pred_old,
            "prediction_new": pred_new,
            "s_old": pa.array(self.s_old),
            "s_new": pa.array(self.s_new),
            "d": pa.array(self.s_new - self.s_old),
            "direction": _categories(flips.direction_codes(self.s_new - self.s_old, self.epsilon), flips.DIRECTIONS),
        }
        if self.correct_old is not None and self.correct_new is not None:
            cols["correct_old"] = pa.array(self.correct_old)
            cols["correct_new"] = pa.array(self.correct_new)
            cols["quadrant"] = _categories(
                flips.quadrant_codes(self.correct_old, self.correct_new, _same(pred_old, pred_new)), flips.QUADRANTS
            )
        return pa.table(cols)


def _categories(codes: np.ndarray, names: tuple[str, ...]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(names, pa.string()))


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> np.ndarray:
    """Row by row, whether both answers are there and equal (a null answers nothing)."""
    return flips.as_numpy(pc.equal(a, b))  # null -> False


def _strings(p: flips.Paired, side: str, name: str, where: np.ndarray | None = None) -> pa.ChunkedArray:
    """A text column of one side's pairs (`where`: of those pairs) as plain strings. A reader
    may hand it over dictionary-encoded, a dictionary per chunk, which Arrow's take would have
    to unify (and refuses to where one holds a null)."""
    column = getattr(p, f"{side}_source").column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    rows = getattr(p, f"{side}_rows")
    return column.take(flips.as_arrow(rows if where is None else rows[where]))


def _same_predictions(p: flips.Paired, where: np.ndarray) -> np.ndarray:
    """`_same` of the predictions of pairs `where`. Read dictionary-encoded on both sides (see
    `read_results`), they compare as integer codes into one dictionary of both sides' values,
    with no string gathered; otherwise as strings."""
    old, new = p.old_source.column("prediction"), p.new_source.column("prediction")
    if not (pa.types.is_dictionary(old.type) and old.type == new.type and len(where)):
        return _same(_strings(p, "old", "prediction", where), _strings(p, "new", "prediction", where))
    values = pc.unique(pa.concat_arrays([c.dictionary for c in (*old.chunks, *new.chunks)]))
    code_old = _codes(old, values)[p.old_rows[where]]
    code_new = _codes(new, values)[p.new_rows[where]]
    return (code_old == code_new) & (code_old >= 0)


def _codes(column: pa.ChunkedArray, values: pa.Array) -> np.ndarray:
    """Per row of a dictionary-encoded column, the index of its value in `values`, or -1 for
    a null (a null index, or an index to a null entry of the dictionary)."""
    parts = []
    for chunk in column.chunks:
        lookup = np.append(flips.as_numpy(pc.index_in(chunk.dictionary, value_set=values)), -1)
        lookup[:-1][~flips.as_numpy(pc.is_valid(chunk.dictionary))] = -1
        index = flips.as_numpy(chunk.indices)
        if chunk.null_count:
            index = np.where(flips.as_numpy(pc.is_valid(chunk)), index, -1)  # -1: the final -1 entry
        parts.append(lookup[index])
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _scores(p: flips.Paired, side: str, metric: str | None, bertscore_model: str | None) -> np.ndarray:
    if metric is None:
        return getattr(p, f"{side}_numpy")("score").astype(np.float64, copy=False)
    preds = pc.fill_null(_strings(p, side, "prediction"), "")
    refs = pc.fill_null(_strings(p, side, "reference"), "")
    if metric == "exact":
        return similarity("exact", preds, refs)
    return similarity(metric, preds.to_pylist(), refs.to_pylist(), bertscore_model=bertscore_model)


def _correct(p: flips.Paired, side: str) -> np.ndarray | None:
    source = getattr(p, f"{side}_source").column("correct")
    if source.null_count and getattr(p, f"{side}_column")("correct").null_count:
        return None
    return getattr(p, f"{side}_numpy")("correct").astype(bool)


def _tasks(table: pa.Table) -> set[str]:
    """The distinct task names in a result set (cheap when read dictionary-encoded)."""
    if "task" not in table.column_names:
        return set()
    names: set[str] = set()
    for chunk in table.column("task").chunks:
        values = (
            chunk.dictionary.take(pc.unique(chunk.indices)) if pa.types.is_dictionary(chunk.type) else pc.unique(chunk)
        )
        names.update(v for v in values.to_pylist() if v is not None)
    return names


def _check_same_task(old: pa.Table, new: pa.Table, names: tuple[str, str]) -> None:
    t_old, t_new = _tasks(old), _tasks(new)
    if t_old and t_new and t_old != t_new:
        raise MuscleError(
            f"{names[0]} holds task {sorted(t_old)} and {names[1]} task {sorted(t_new)}: results of "
            "different tasks would join by id by accident (--allow-task-mismatch to compare anyway)"
        )


def compare(
    old: pa.Table,
    new: pa.Table,
    metric: str | None = None,
    epsilon: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
    bertscore_model: str | None = None,
    names: tuple[str, str] = ("OLD", "NEW"),
    allow_task_mismatch: bool = False,
) -> Comparison:
    """All flip metrics of OLD -> NEW as one JSON-ready summary (see the module docstring).

    Refuses (MuscleError) result sets of different tasks, whose ids would join by accident,
    unless `allow_task_mismatch`, and a comparison in which no instance joins.
    """
    if epsilon < 0:
        raise ValueError("epsilon must be >= 0")
    if not allow_task_mismatch:
        _check_same_task(old, new, names)
    p = flips.pair(old, new, names)
    if p.n == 0:
        raise MuscleError(
            f"{names[0]} ({old.num_rows} rows) and {names[1]} ({new.num_rows} rows) share no instance id: "
            "nothing to compare"
            + (
                f" (ids e.g. {p.only_old_examples[:2]} vs {p.only_new_examples[:2]})"
                if old.num_rows and new.num_rows
                else ""
            )
        )
    s_old = _scores(p, "old", metric, bertscore_model)
    s_new = _scores(p, "new", metric, bertscore_model)
    if metric is None:
        c_old, c_new = _correct(p, "old"), _correct(p, "new")
        if c_old is None or c_new is None:
            c_old = c_new = None
    elif metric == "exact":
        c_old, c_new = s_old == 1.0, s_new == 1.0
    else:
        c_old = c_new = None
    cont = flips.continuous_metrics(s_old, s_new, epsilon, n_boot, seed, mean_ci=c_old is None)
    summary = {
        "n": p.n,
        "only_old": p.only_old,
        "only_new": p.only_new,
        "only_old_examples": p.only_old_examples,
        "only_new_examples": p.only_new_examples,
        "metric": metric or "score",
        "epsilon": epsilon,
    }
    if c_old is not None and c_new is not None:
        summary["kind"] = "discrete"
        # Whether the answers agree matters only where NEW is wrong (both-wrong split and
        # NFR_mc), so only those rows' answers are compared; the rest stay False.
        new_wrong = np.flatnonzero(~c_new)
        same = np.zeros(p.n, dtype=bool)
        same[new_wrong] = _same_predictions(p, new_wrong)
        summary.update(flips.discrete_metrics(c_old, c_new, same, n_boot, seed))
    else:
        summary["kind"] = "continuous"
        summary.update(
            {
                "acc_old": cont["score_old"],
                "acc_new": cont["score_new"],
                "nfr": cont["nfr"],
                "pfr": cont["pfr"],
                "nfr_mc": None,
                "quadrants": None,
                "btc": None,
                "bec": None,
                "mcnemar_p": cont["sign_test_p"],
                "ci": {"delta_acc": cont["ci"]["delta_score"], "nfr": cont["ci"]["nfr"], "pfr": cont["ci"]["pfr"]},
            }
        )
    summary["m_g"] = cont["m_g"]
    summary["m_r"] = cont["m_r"]
    summary["continuous"] = cont
    return Comparison(p, s_old, s_new, c_old, c_new, flips.clean(summary), epsilon)


def compat_deltas(base: dict, compat: dict) -> dict:
    """The paper's Table 4-7 deltas of OLD->COMPAT against OLD->NEW (in fractions, not %).

    ΔNFR_c = NFR_c - NFR; Δ%NFR_c = 100·ΔNFR_c / NFR; Δacc_c = acc_c - acc_new;
    ΔPFR_c = PFR_c - PFR; Δm_g = m_g(c) - m_g; Δm_r = m_r(c) - m_r.
    """

    def sub(a, b):
        return None if a is None or b is None else a - b

    d_nfr = sub(compat["nfr"], base["nfr"])
    return {
        "d_nfr_c": d_nfr,
        "d_pct_nfr_c": None if d_nfr is None or not base["nfr"] else 100.0 * d_nfr / base["nfr"],
        "d_acc_c": sub(compat["acc_new"], base["acc_new"]),
        "d_pfr_c": sub(compat["pfr"], base["pfr"]),
        "d_m_g": sub(compat["m_g"], base["m_g"]),
        "d_m_r": sub(compat["m_r"], base["m_r"]),
    }
