"""Flip metrics between two result sets of one task (MUSCLE, arXiv 2407.09435, §2).

Everything is computed on the inner join of the two sets by `id`; ids on one side only are
counted (`only_old`, `only_new`) and reported with examples, never dropped silently.

Discrete (per-instance `correct`, e.g. multiple choice or exact match), over N joined rows:
  acc_old, acc_new; NFR = mean(old right & new wrong); PFR = mean(old wrong & new right);
  NFR_mc = mean(new wrong & new prediction != old prediction) (inconsistency flips);
  five quadrants: both_right, positive_flip, both_wrong_same, both_wrong_different,
  negative_flip; BTC = both_right / old-correct (backward trust compatibility: the share of
  the old model's right answers the new one keeps); BEC = both wrong / new-wrong (backward
  error compatibility, Srivastava et al. 2020: the share of the new model's errors that the
  old model also made, i.e. errors users already knew about).
Continuous (any per-instance score S): D = S(new) - S(old); PFR = mean(D > eps), NFR =
  mean(D < -eps) (eps = 0: any change counts, the paper's rule); m_g = mean D over improved,
  m_r = mean |D| over regressed. With S = correctness these equal the discrete PFR and NFR.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from muscle_ray.metrics import stats


class Quadrant(enum.IntEnum):
    """Where one instance lands in an update; the value is its code in flip tables."""

    BOTH_RIGHT = 0
    POSITIVE_FLIP = 1
    BOTH_WRONG_SAME = 2
    BOTH_WRONG_DIFFERENT = 3
    NEGATIVE_FLIP = 4


QUADRANTS = tuple(q.name.lower() for q in Quadrant)
DIRECTIONS = ("improved", "tie", "regressed")
EXAMPLES = 5


@dataclass
class Paired:
    """Two result sets aligned on their shared ids, as row numbers into each source.

    Columns are gathered on demand (`old_column`, `new_column`, optionally for a subset of
    the pairs), so a summary never pays for copying the wide string columns it does not
    need. Pairs are in OLD's row order.
    """

    old_source: pa.Table
    new_source: pa.Table
    old_rows: np.ndarray
    new_rows: np.ndarray
    only_old: int
    only_new: int
    only_old_examples: list[str] = field(default_factory=list)
    only_new_examples: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.old_rows)

    def old_column(self, name: str, where: np.ndarray | None = None) -> pa.ChunkedArray:
        return _take(self.old_source, name, self.old_rows, where)

    def new_column(self, name: str, where: np.ndarray | None = None) -> pa.ChunkedArray:
        return _take(self.new_source, name, self.new_rows, where)

    def old_numpy(self, name: str) -> np.ndarray:
        return self.old_source.column(name).to_numpy()[self.old_rows]

    def new_numpy(self, name: str) -> np.ndarray:
        return self.new_source.column(name).to_numpy()[self.new_rows]


def _take(table: pa.Table, name: str, rows: np.ndarray, where: np.ndarray | None) -> pa.ChunkedArray:
    return table.column(name).take(rows if where is None else rows[where])


def pair(old: pa.Table, new: pa.Table, names: tuple[str, str] = ("OLD", "NEW")) -> Paired:
    """Inner-join by id; also checks that ids are unique on each side.

    One hash pass: dictionary-encode both sides' ids together, so equal ids get equal
    integer codes; the join and the duplicate check are then O(N) numpy scatters and
    gathers (no sort, no Python loop). Pairs come in OLD's row order, which makes the
    flip table deterministic; columns are gathered later, only those a caller needs.
    """
    n_old = old.num_rows
    ids = pa.concat_arrays(list(old.column("id").chunks) + list(new.column("id").chunks) or [pa.array([], pa.string())])
    encoded = pc.dictionary_encode(ids)  # one contiguous array hashes ~10% faster than chunks
    codes = encoded.indices.to_numpy()
    k = len(encoded.dictionary)
    code_old, code_new = codes[:n_old], codes[n_old:]
    _check_unique(old, code_old, k, names[0])
    _check_unique(new, code_new, k, names[1])
    row_in_new = np.full(k, -1, dtype=np.int64)
    row_in_new[code_new] = np.arange(len(code_new), dtype=np.int64)
    hit = row_in_new[code_old]
    io = np.flatnonzero(hit >= 0)
    inew = hit[io]
    return Paired(
        old_source=old,
        new_source=new,
        old_rows=io,
        new_rows=inew,
        only_old=old.num_rows - len(io),
        only_new=new.num_rows - len(inew),
        only_old_examples=_unmatched(old, io),
        only_new_examples=_unmatched(new, inew),
    )


def _check_unique(table: pa.Table, codes: np.ndarray, k: int, name: str) -> None:
    from muscle_ray.errors import MuscleError

    counts = np.bincount(codes, minlength=k)
    if len(counts) and counts.max() > 1:
        dup = np.flatnonzero(counts[codes] > 1)
        first = int(dup[0])
        second = int(dup[1:][codes[dup[1:]] == codes[first]][0])
        value = table.column("id")[first].as_py()
        raise MuscleError(f"{name}: column 'id' has duplicate id {value!r} at rows {first} and {second}")


def _unmatched(table: pa.Table, matched: np.ndarray) -> list[str]:
    if len(matched) == table.num_rows:
        return []
    mask = np.ones(table.num_rows, dtype=bool)
    mask[matched] = False
    return table.column("id").take(np.flatnonzero(mask)[:EXAMPLES]).to_pylist()


# --- discrete --------------------------------------------------------------------------


def quadrant_codes(correct_old: np.ndarray, correct_new: np.ndarray, same_prediction: np.ndarray) -> np.ndarray:
    """Per-instance `Quadrant` code."""
    co, cn = correct_old.astype(bool), correct_new.astype(bool)
    codes = np.full(len(co), Quadrant.NEGATIVE_FLIP, dtype=np.int8)
    codes[co & cn] = Quadrant.BOTH_RIGHT
    codes[~co & cn] = Quadrant.POSITIVE_FLIP
    both_wrong = ~co & ~cn
    codes[both_wrong & same_prediction] = Quadrant.BOTH_WRONG_SAME
    codes[both_wrong & ~same_prediction] = Quadrant.BOTH_WRONG_DIFFERENT
    return codes


def discrete_metrics(
    correct_old: np.ndarray,
    correct_new: np.ndarray,
    same_prediction: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """acc, NFR, PFR, NFR_mc, quadrants, BTC, BEC, McNemar p and bootstrap CIs."""
    co, cn, same = correct_old.astype(bool), correct_new.astype(bool), same_prediction.astype(bool)
    n = len(co)
    counts = np.bincount(quadrant_codes(co, cn, same), minlength=len(Quadrant)).astype(np.int64)
    both_right, pos, bw_same, bw_diff, neg = (int(x) for x in counts)
    nfr_mc_count = int(np.count_nonzero(~cn & ~same))
    old_right = both_right + neg
    new_wrong = bw_same + bw_diff + neg
    boot = stats.bootstrap_counts(counts, n_boot, seed) / max(n, 1)
    return {
        "acc_old": _div(old_right, n),
        "acc_new": _div(both_right + pos, n),
        "nfr": _div(neg, n),
        "pfr": _div(pos, n),
        "nfr_mc": _div(nfr_mc_count, n),
        "quadrants": dict(zip(QUADRANTS, (int(x) for x in counts))),
        "btc": _div(both_right, old_right),
        "bec": _div(bw_same + bw_diff, new_wrong),
        "mcnemar_p": stats.mcnemar_p(pos, neg),
        "ci": {
            "delta_acc": stats.percentile_ci(boot[:, 1] - boot[:, 4]) if n else None,
            "nfr": stats.percentile_ci(boot[:, 4]) if n else None,
            "pfr": stats.percentile_ci(boot[:, 1]) if n else None,
        },
    }


# --- continuous ------------------------------------------------------------------------


def direction_codes(d: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
    """Per-instance index into DIRECTIONS: improved (D > eps), tie, regressed (D < -eps)."""
    codes = np.ones(len(d), dtype=np.int8)
    codes[d > epsilon] = 0
    codes[d < -epsilon] = 2
    return codes


def continuous_metrics(
    s_old: np.ndarray,
    s_new: np.ndarray,
    epsilon: float = 0.0,
    n_boot: int = 2000,
    seed: int = 0,
    mean_ci: bool = True,
) -> dict:
    """Mean scores, PFR/NFR of D = S(new) - S(old) beyond ±eps, m_g, m_r, sign test, CIs.

    The CIs of PFR and NFR use the exact multinomial shortcut on (improved, tie, regressed)
    counts; the CI of mean(D) needs a row-level bootstrap, O(n_boot * N), so `mean_ci=False`
    skips it where the discrete Δacc interval already answers the question.
    """
    s_old = np.asarray(s_old, dtype=np.float64)
    s_new = np.asarray(s_new, dtype=np.float64)
    d = s_new - s_old
    n = len(d)
    codes = direction_codes(d, epsilon)
    counts = np.bincount(codes, minlength=3).astype(np.int64)
    improved, _, regressed = (int(x) for x in counts)
    boot = stats.bootstrap_counts(counts, n_boot, seed) / max(n, 1)
    return {
        "score_old": _mean(s_old),
        "score_new": _mean(s_new),
        "pfr": _div(improved, n),
        "nfr": _div(regressed, n),
        "m_g": _mean(d[codes == 0]),
        "m_r": _mean(-d[codes == 2]),
        "improved": improved,
        "regressed": regressed,
        "sign_test_p": stats.mcnemar_p(improved, regressed),
        "ci": {
            "delta_score": stats.bootstrap_mean_ci(d, n_boot, seed) if n and mean_ci else None,
            "nfr": stats.percentile_ci(boot[:, 2]) if n else None,
            "pfr": stats.percentile_ci(boot[:, 0]) if n else None,
        },
    }


def _div(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None


def clean(obj):
    """NaN/inf -> None so the summary is strict JSON."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
