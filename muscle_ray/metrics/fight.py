"""A fair fight between the compat adapter and its control, computed rather than narrated.

Per task, compat (MUSCLE) and the control (the v2 adapter trained on with plain CE for the
same steps from the same start) are scored at snapshots every K steps; step 0 is the v2 task
adapter itself, so both curves start at the same point. Each snapshot is a Comparison of v1
against it on the same eval set. From those:

- `curve`: accuracy, NFR, PFR (and NFR_mc, both-wrong-different for discrete tasks) per step.
- `matched_accuracy`: NFR of each curve at one common accuracy a*, with a paired bootstrap
  interval of the difference. The NFR of a curve at accuracy a is read off the piecewise-linear
  path through its snapshots in step order; where that path passes accuracy a more than once
  (a curve not monotone in accuracy), the lowest NFR among the crossings is taken: the lower
  envelope of the path, the same rule for both curves. On a monotone curve this is plain linear
  interpolation between the two snapshots around a.
- `mcnemar_vs_control`: do the final compat and control differ on v1's right answers?
- `plateau`, `flip_overlap`, `select_for_compat`: is the world fit for the question (are the
  adapters done training, are flips the bases' doing rather than adapter noise), and which
  snapshot one would ship if selecting for compatibility on validation data.
- `verdict`: the claim, from the numbers.

For continuous metrics (ROUGE-1, ...) "acc" is the mean score and NFR = mean(D < -eps), as in
`compare`'s summary; "v1 right" is every instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from muscle_ray.errors import MuscleError
from muscle_ray.metrics import stats
from muscle_ray.metrics.compare import Comparison
from muscle_ray.metrics.format import pct

BOOT_CELLS = 20_000_000  # replicate x instance cells per bootstrap chunk (bounds memory at ~160 MB)
INTERP = "lower envelope of the step-order path (linear interpolation between snapshots)"


@dataclass
class Snap:
    """One snapshot of a training run, as v1 -> snapshot flips (step 0 = the v2 task adapter)."""

    step: int
    cmp: Comparison


@dataclass
class _Aligned:
    """Per-instance arrays of one comparison, in the reference comparison's id order."""

    name: str
    discrete: bool
    score: np.ndarray  # correct_new as 0/1, or S(new)
    regressed: np.ndarray  # a negative flip: v1 right & new wrong, or D < -eps
    v1_right: np.ndarray  # where McNemar looks: v1 right (discrete) or every instance
    v1: np.ndarray  # v1's side, to check comparisons share it


def _ids(cmp: Comparison) -> pa.Array:
    return cmp.paired.old_column("id").combine_chunks()


def _examples(ids: pa.Array, mask: pa.Array) -> list:
    return ids.filter(mask)[:3].to_pylist()


def _order(ref: pa.Array, ref_name: str, ids: pa.Array, name: str) -> np.ndarray | None:
    """Row order that puts `ids` in `ref`'s order (None: already so); MuscleError if the sets differ."""
    if ids.equals(ref):
        return None
    pos = pc.index_in(ids, value_set=ref)
    if pos.null_count or len(ids) != len(ref):
        only_here = pc.is_null(pos)
        only_ref = pc.invert(pc.is_in(ref, value_set=ids))
        raise MuscleError(
            f"{name} and {ref_name} joined different instances: {pc.sum(only_here).as_py() or 0} ids only in "
            f"{name} (e.g. {_examples(ids, only_here)}), {pc.sum(only_ref).as_py() or 0} only in {ref_name} "
            f"(e.g. {_examples(ref, only_ref)}); comparisons of one task must share the eval set"
        )
    order = np.empty(len(ids), dtype=np.int64)
    order[pos.to_numpy()] = np.arange(len(ids))
    return order


def _align(named: list[tuple[str, Comparison]], same_v1: bool = True) -> list[_Aligned]:
    """Every comparison's per-instance arrays in the first one's id order.

    Raises MuscleError naming the comparison whose ids (or, with `same_v1`, whose v1 side)
    differ from the first's, or that mixes a discrete comparison with a continuous one.
    """
    if not named:
        raise ValueError("no comparisons to align")
    ref_name, ref_cmp = named[0]
    ref = _ids(ref_cmp)
    out: list[_Aligned] = []
    for name, cmp in named:
        order = _order(ref, ref_name, _ids(cmp), name)

        def take(x: np.ndarray, order: np.ndarray | None = order) -> np.ndarray:
            return x if order is None else x[order]

        discrete = cmp.correct_old is not None and cmp.correct_new is not None
        if discrete:
            c_old, c_new = take(cmp.correct_old), take(cmp.correct_new)  # type: ignore[arg-type]
            side = _Aligned(name, True, c_new.astype(np.float64), c_old & ~c_new, c_old, c_old.astype(np.float64))
        else:
            s_old, s_new = take(cmp.s_old), take(cmp.s_new)
            every = np.ones(len(s_old), dtype=bool)
            side = _Aligned(name, False, s_new, (s_new - s_old) < -cmp.epsilon, every, s_old)
        if out and side.discrete != out[0].discrete:
            kinds = {True: "discrete", False: "continuous"}
            raise MuscleError(
                f"{name} is {kinds[side.discrete]} and {ref_name} {kinds[out[0].discrete]}: "
                "compare them with the same metric"
            )
        if same_v1 and out:
            differ = ~np.isclose(side.v1, out[0].v1, rtol=0.0, atol=1e-9, equal_nan=True)
            if differ.any():
                first = ref[int(np.flatnonzero(differ)[0])].as_py()
                raise MuscleError(
                    f"{name}: v1's scores differ from {ref_name}'s on {int(differ.sum())} instances "
                    f"(e.g. id {first!r}): comparisons of one task must share v1's results"
                )
        out.append(side)
    return out


def _sorted(snaps: list[Snap], label: str) -> list[Snap]:
    if not snaps:
        raise MuscleError(f"{label}: no snapshots")
    snaps = sorted(snaps, key=lambda s: s.step)
    steps = [s.step for s in snaps]
    if len(set(steps)) != len(steps):
        raise MuscleError(f"{label}: duplicate snapshot steps {sorted({s for s in steps if steps.count(s) > 1})}")
    return snaps


def _named(snaps: list[Snap], label: str) -> list[tuple[str, Comparison]]:
    return [(f"{label} step {s.step}", s.cmp) for s in snaps]


# --- curves ------------------------------------------------------------------------------


def curve(snaps: list[Snap]) -> list[dict]:
    """Per snapshot, in step order: {step, acc, nfr, pfr, nfr_mc, both_wrong_diff}.

    The last two are rates over all instances, None for continuous metrics. Raises
    MuscleError when the snapshots do not share the eval set and v1's results.
    """
    snaps = _sorted(snaps, "curve")
    _align(_named(snaps, "snapshot"))
    return [point(s.cmp, s.step) for s in snaps]


def point(cmp: Comparison, step: int | None = None) -> dict:
    """One comparison's entry of a curve (also the test row of a selected snapshot)."""
    s = cmp.summary
    q = s.get("quadrants")
    return {
        "step": step,
        "acc": s["acc_new"],
        "nfr": s["nfr"],
        "pfr": s["pfr"],
        "nfr_mc": s.get("nfr_mc"),
        "both_wrong_diff": q["both_wrong_different"] / s["n"] if q and s["n"] else None,
    }


def _nfr_at(acc: np.ndarray, nfr: np.ndarray, at: np.ndarray) -> np.ndarray:
    """NFR of each row's curve at accuracy `at` (rows: bootstrap replicates; columns: snapshots
    in step order): the lowest NFR where the piecewise-linear path crosses `at`, NaN if it never does."""
    a = at[:, None]
    x0, x1, y0, y1 = acc[:, :-1], acc[:, 1:], nfr[:, :-1], nfr[:, 1:]
    crossing = (np.minimum(x0, x1) <= a) & (a <= np.maximum(x0, x1)) & (x0 != x1)
    with np.errstate(invalid="ignore", divide="ignore"):
        on_segment = np.where(crossing, y0 + (a - x0) / (x1 - x0) * (y1 - y0), np.inf)
    at_snapshot = np.where(acc == a, nfr, np.inf)
    best = np.minimum(on_segment.min(axis=1, initial=np.inf), at_snapshot.min(axis=1))
    return np.where(np.isfinite(best), best, np.nan)


def _target(acc_c: np.ndarray, acc_k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """a* per row: the control's final accuracy where the compat curve spans it, else the middle
    of the accuracy range both curves span (NaN where they share none); also that range and
    whether the first rule applied."""
    lo = np.maximum(acc_c.min(axis=1), acc_k.min(axis=1))
    hi = np.minimum(acc_c.max(axis=1), acc_k.max(axis=1))
    final = acc_k[:, -1]
    spans = (acc_c.min(axis=1) <= final) & (final <= acc_c.max(axis=1))
    a = np.where(spans, final, np.where(lo <= hi, (lo + hi) / 2, np.nan))
    return a, lo, hi, spans


def _boot_means(mats: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of each row of `mats` (k x N per-instance values) on `n_boot` resamples of the
    N instances, as (n_boot, k): one resample of indices per replicate, shared by every row."""
    k, n = mats.shape
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, BOOT_CELLS // max(n, 1)))
    out = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        out.append(counts @ mats.T / n)
    return np.concatenate(out) if out else np.zeros((0, k))


def matched_accuracy(
    compat: list[Snap], control: list[Snap], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """NFR of compat and of the control at one common accuracy a*, and a paired bootstrap CI
    of their difference.

    a* is the control's final accuracy when the compat curve spans it (compat gets where the
    control ended), otherwise the middle of the accuracy range both curves span. The bootstrap
    resamples instances (the same resample for every snapshot of both curves) and recomputes
    the whole statistic on each replicate, a* included, so the interval carries a*'s
    uncertainty too; replicates whose curves share no accuracy are dropped (`n_boot_valid`).

    Both curves start at v2 (step 0), so they always share that point: the range they share is
    taken over their later snapshots only (the paths from step 0 still interpolate), else a
    compat run that collapsed would be "matched" with the control at v2's own accuracy.
    """
    compat, control = _sorted(compat, "compat"), _sorted(control, "control")
    sides = _align(_named(control, "control") + _named(compat, "compat"))
    k = len(control)
    # Columns of the snapshots after the shared start, for the target accuracy.
    c0 = k + (1 if compat[0].step == 0 and len(compat) > 1 else 0)
    k0 = 1 if control[0].step == 0 and len(control) > 1 else 0
    acc_m = np.stack([s.score for s in sides])
    nfr_m = np.stack([s.regressed.astype(np.float64) for s in sides])
    acc, nfr = acc_m.mean(axis=1)[None, :], nfr_m.mean(axis=1)[None, :]
    a, lo, hi, spans = _target(acc[:, c0:], acc[:, k0:k])
    out = {
        "acc": None,
        "nfr_compat": None,
        "nfr_control": None,
        "diff": None,
        "ci": None,
        "level": level,
        "overlap": [float(lo[0]), float(hi[0])] if lo[0] <= hi[0] else None,
        "rule": None,
        "interp": INTERP,
        "n_boot": n_boot,
        "n_boot_valid": 0,
    }
    if np.isnan(a[0]):
        acc_c, acc_k = acc[0, c0:], acc[0, k0:k]
        out["reason"] = (
            "the curves share no accuracy after their common start (v2): "
            f"compat spans {pct(acc_c.min())}-{pct(acc_c.max())}%, "
            f"the control {pct(acc_k.min())}-{pct(acc_k.max())}%"
        )
        return out
    x = _nfr_at(acc[:, k:], nfr[:, k:], a)[0]
    y = _nfr_at(acc[:, :k], nfr[:, :k], a)[0]
    out.update(
        acc=float(a[0]),
        nfr_compat=float(x),
        nfr_control=float(y),
        diff=float(x - y),
        rule="control final" if spans[0] else "overlap middle",
    )
    if n_boot > 0:
        boot = _boot_means(np.concatenate([acc_m, nfr_m]), n_boot, seed)
        b_acc, b_nfr = boot[:, : len(sides)], boot[:, len(sides) :]
        b_a = _target(b_acc[:, c0:], b_acc[:, k0:k])[0]
        diff = _nfr_at(b_acc[:, k:], b_nfr[:, k:], b_a) - _nfr_at(b_acc[:, :k], b_nfr[:, :k], b_a)
        diff = diff[~np.isnan(diff)]
        out["n_boot_valid"] = int(len(diff))
        out["ci"] = stats.percentile_ci(diff, level) if len(diff) else None
    return out


# --- paired tests ------------------------------------------------------------------------


def mcnemar_vs_control(compat: Comparison, control: Comparison) -> dict:
    """Paired McNemar of compat against the control on the instances v1 gets right (all
    instances for continuous metrics, where "regressed" is D < -eps).

    b: compat keeps v1's answer where the control regresses; c: the reverse.
    """
    ctl, new = _align([("control", control), ("compat", compat)])
    where = ctl.v1_right
    b = int(np.count_nonzero(where & ~new.regressed & ctl.regressed))
    c = int(np.count_nonzero(where & new.regressed & ~ctl.regressed))
    return {
        "n": int(np.count_nonzero(where)),
        "b": b,
        "c": c,
        "both": int(np.count_nonzero(where & new.regressed & ctl.regressed)),
        "p": stats.mcnemar_p(b, c),
    }


def pooled_mcnemar(results: list[dict]) -> dict:
    """McNemar over several base-seed pairs, summing b and c: under H0 every discordant
    instance of every pair is a fair coin. (The pairs share the eval set, so an instance
    counts once per pair; the test assumes their coins are independent.)"""
    b = sum(int(r["b"]) for r in results)
    c = sum(int(r["c"]) for r in results)
    return {"b": b, "c": c, "n": sum(int(r["n"]) for r in results), "p": stats.mcnemar_p(b, c), "pairs": len(results)}


# --- is the world fit for the question -----------------------------------------------------


def _jaccard_chance(n: int, a: int, b: int) -> float:
    """E[|A∩B| / |A∪B|] for independent uniform random subsets of sizes a and b out of n:
    the intersection is hypergeometric (n, a, b)."""
    if a == 0 and b == 0:
        return float("nan")
    log_total = _log_comb(n, b)
    expected = 0.0
    for x in range(max(1, a + b - n), min(a, b) + 1):
        log_p = _log_comb(a, x) + _log_comb(n - a, b - x) - log_total
        expected += math.exp(log_p) * x / (a + b - x)
    return expected


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def flip_overlap(cmps: list[Comparison]) -> dict:
    """Do the negative flips of v1 -> v2 under several adapter seeds land on the same
    instances? A ratio of mean pairwise Jaccard to its chance value far above 1 says the
    flips are the bases' doing; near 1, adapter noise. (Each seed has its own v1 adapter,
    so only the eval set must be shared.)"""
    sides = _align([(f"adapter seed #{i}", c) for i, c in enumerate(cmps)], same_v1=False)
    n = len(sides[0].score)
    sets = [s.regressed for s in sides]
    pairs, chance = [], []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = int(np.count_nonzero(sets[i] | sets[j]))
            if union == 0:
                continue
            pairs.append(int(np.count_nonzero(sets[i] & sets[j])) / union)
            chance.append(_jaccard_chance(n, int(sets[i].sum()), int(sets[j].sum())))
    acc_v1 = [float(np.mean(s.v1)) for s in sides]
    acc_v2 = [float(np.mean(s.score)) for s in sides]
    jaccard = float(np.mean(pairs)) if pairs else None
    jaccard_chance = float(np.mean(chance)) if chance else None
    return {
        "seeds": len(cmps),
        "n": n,
        "nfr": [float(np.mean(s)) for s in sets],
        "acc_v1": acc_v1,
        "acc_v2": acc_v2,
        "acc_v1_range": max(acc_v1) - min(acc_v1),
        "acc_v2_range": max(acc_v2) - min(acc_v2),
        "jaccard_pairs": pairs,
        "jaccard": jaccard,
        "jaccard_chance": jaccard_chance,
        "ratio": jaccard / jaccard_chance if jaccard is not None and jaccard_chance else None,
    }


def plateau(v2: Comparison, control: list[Snap], threshold: float = 0.01) -> dict:
    """Was the v2 adapter done training? How far plain CE continuation (the control's
    snapshots) moves its accuracy; `at_plateau` when the final move is under `threshold`."""
    control = _sorted(control, "control")
    _align([("v2", v2), *_named(control, "control")])
    acc_v2 = v2.summary["acc_new"]
    accs = [s.cmp.summary["acc_new"] for s in control]
    delta = accs[-1] - acc_v2
    return {
        "steps": control[-1].step,
        "acc_v2": acc_v2,
        "acc_after": accs[-1],
        "delta": delta,
        "max_abs_delta": max(abs(a - acc_v2) for a in accs),
        "threshold": threshold,
        "at_plateau": abs(delta) < threshold,
    }


def select_for_compat(v2_val: Comparison, snaps_val: list[Snap], floor: float = 0.0) -> dict | None:
    """Selection for compatibility on validation data: among snapshots whose accuracy is at
    least v2's minus `floor`, the one with the lowest NFR (ties: the later step); None if
    none qualifies."""
    if floor < 0:
        raise ValueError("floor must be >= 0")
    snaps_val = _sorted(snaps_val, "validation snapshots")
    _align([("v2 (validation)", v2_val), *_named(snaps_val, "validation snapshot")])
    least = v2_val.summary["acc_new"] - floor
    ok = [s for s in snaps_val if s.cmp.summary["acc_new"] >= least - 1e-12]
    if not ok:
        return None
    best = min(ok, key=lambda s: (s.cmp.summary["nfr"], -s.step))
    return {
        "step": best.step,
        "val_acc": best.cmp.summary["acc_new"],
        "val_nfr": best.cmp.summary["nfr"],
        "floor": floor,
        "val_acc_v2": v2_val.summary["acc_new"],
    }


# --- the verdict -------------------------------------------------------------------------


def dominance(compat: list[dict], control: list[dict]) -> str | None:
    """Which curve dominates the other when they share no accuracy: "compat" when every compat
    snapshot after the common start (v2, step 0) is more accurate *and* has a lower NFR than every
    control snapshot after it, "control" the mirror image, else None. Curves are `curve` points."""

    def later(points: list[dict]) -> list[dict]:
        return [p for p in points if p["step"] != 0] or points

    def beats(a: list[dict], b: list[dict]) -> bool:
        more_accurate = min(p["acc"] for p in a) > max(p["acc"] for p in b)
        return more_accurate and max(p["nfr"] for p in a) < min(p["nfr"] for p in b)

    a, b = later(compat), later(control)
    return "compat" if beats(a, b) else "control" if beats(b, a) else None


def verdict(matched: dict, mcnemar: dict, alpha: float = 0.05, dominant: str | None = None) -> dict:
    """The claim, from both tests: "compat better" needs the matched-accuracy interval of
    NFR(compat) - NFR(control) wholly below 0 *and* McNemar significant at `alpha` with b > c
    ("control better" the mirror image); anything less is "no significant difference". Curves
    sharing no accuracy have no matched point: one that dominates the other (`dominance`: more
    accurate and fewer flips at every snapshot) wins if McNemar agrees, else "not comparable"."""
    if matched.get("diff") is None:
        b, c, p = mcnemar["b"], mcnemar["c"], mcnemar["p"]
        why = (
            f"{matched.get('reason', 'no common accuracy')}; on {mcnemar['n']} instances v1 gets right the "
            f"final compat keeps {b} the control breaks and breaks {c} it keeps (McNemar p={p:.3g})"
        )
        if dominant and (b > c if dominant == "compat" else c > b) and p < alpha:
            return {
                "verdict": f"{dominant} better",
                "why": f"{dominant} dominates: more accurate with fewer negative flips at every snapshot; {why}",
            }
        return {"verdict": "not comparable", "why": why}
    ci, level = matched.get("ci"), matched.get("level", 0.95)
    b, c, p = mcnemar["b"], mcnemar["c"], mcnemar["p"]
    ci_text = f"{100 * level:g}% CI [{pct(ci[0], True)}, {pct(ci[1], True)}]" if ci else "no bootstrap interval"
    why = (
        f"at matched accuracy {pct(matched['acc'])}% compat's NFR is {pct(matched['nfr_compat'])}% against the "
        f"control's {pct(matched['nfr_control'])}% (difference {pct(matched['diff'], True)} points, {ci_text}), "
        f"and on {mcnemar['n']} instances v1 gets right compat keeps {b} the control breaks and breaks {c} it keeps "
        f"(McNemar p={p:.3g})"
    )
    if ci and ci[1] < 0 and b > c and p < alpha:
        return {"verdict": "compat better", "why": why}
    if ci and ci[0] > 0 and c > b and p < alpha:
        return {"verdict": "control better", "why": why}
    return {"verdict": "no significant difference", "why": why}


def fair_fight(compat: list[Snap], control: list[Snap], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """A task row's "fight": both curves, NFR at matched accuracy (interval at level 1 - alpha),
    McNemar of the final snapshots (with their steps), and the verdict."""
    compat, control = _sorted(compat, "compat"), _sorted(control, "control")
    matched = matched_accuracy(compat, control, n_boot=n_boot, seed=seed, level=1.0 - alpha)
    mc = {
        **mcnemar_vs_control(compat[-1].cmp, control[-1].cmp),
        "step_compat": compat[-1].step,
        "step_control": control[-1].step,
    }
    curves = {"compat": curve(compat), "control": curve(control)}
    return {
        "curves": curves,
        "matched": matched,
        "mcnemar": mc,
        "verdict": verdict(matched, mc, alpha, dominance(curves["compat"], curves["control"])),
    }
