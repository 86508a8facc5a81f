"""The fair fight's numbers on hand-made curves: interpolation, bootstrap, McNemar, overlap, verdicts."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pytest

from muscle_ray.errors import MuscleError
from muscle_ray.metrics import fight, stats
from muscle_ray.metrics.compare import compare
from muscle_ray.metrics.fight import Snap
from muscle_ray.report import mean_over_seeds, task_row, verdict, write_report

N = 100
V1 = np.arange(N) < 60  # v1 right on the first 60 instances


def results(correct=None, ids=None, score=None) -> pa.Table:
    """A result table (gold answer "0"); `ids` reorder or rename the instances; with only
    `score` (no `correct`), a continuous one."""
    n = len(correct if correct is not None else score)
    c = np.zeros(n, dtype=bool) if correct is None else np.asarray(correct, dtype=bool)
    return pa.table(
        {
            "id": ids if ids is not None else [f"i{k}" for k in range(n)],
            "task": ["t"] * n,
            "correct": pa.array([None] * n, pa.bool_()) if correct is None else c.tolist(),
            "score": score if score is not None else c.astype(float).tolist(),
            "prediction": np.where(c, "0", "1").tolist(),
        }
    )


def flipped(broken: int, fixed: int, v1: np.ndarray = V1) -> np.ndarray:
    """v1's correctness with the first `broken` of its right answers wrong and the first
    `fixed` of its wrong ones right: acc = acc_v1 + (fixed - broken) / n, NFR = broken / n."""
    c = v1.copy()
    c[np.flatnonzero(v1)[:broken]] = False
    c[np.flatnonzero(~v1)[:fixed]] = True
    return c


def snaps(points: list[tuple[int, int, int]], v1: np.ndarray = V1, reps: int = 1) -> list[Snap]:
    """(step, broken, fixed) per snapshot; `reps` tiles the instances (same rates, reps x n)."""
    old = results(np.tile(v1, reps))
    return [Snap(s, compare(old, results(np.tile(flipped(b, f, v1), reps)), n_boot=10)) for s, b, f in points]


START = (0, 10, 10)  # v2: acc 60%, NFR 10%
CONTROL = [START, (100, 8, 16), (200, 6, 20)]  # acc 60 -> 68 -> 74, NFR 10 -> 8 -> 6
COMPAT = [START, (100, 5, 12), (200, 4, 20)]  # acc 60 -> 67 -> 76, NFR 10 -> 5 -> 4


def test_curve_is_in_step_order_with_every_rate():
    c = fight.curve(snaps(CONTROL[::-1]))
    assert [p["step"] for p in c] == [0, 100, 200]
    assert [p["acc"] for p in c] == pytest.approx([0.60, 0.68, 0.74])
    assert [p["nfr"] for p in c] == pytest.approx([0.10, 0.08, 0.06])
    assert [p["pfr"] for p in c] == pytest.approx([0.10, 0.16, 0.20])
    assert c[0]["both_wrong_diff"] == 0.0 and c[0]["nfr_mc"] == pytest.approx(0.10)
    with pytest.raises(MuscleError, match="duplicate snapshot steps"):
        fight.curve(snaps([START, START]))


def test_matched_accuracy_interpolates_at_the_controls_final_accuracy():
    m = fight.matched_accuracy(snaps(COMPAT), snaps(CONTROL), n_boot=200)
    # compat spans 60-76%, so a* = the control's final 74%; compat between (67%, 5%) and (76%, 4%).
    assert m["rule"] == "control final" and m["acc"] == pytest.approx(0.74)
    assert m["nfr_compat"] == pytest.approx(0.05 - 7 / 9 * 0.01)
    assert m["nfr_control"] == pytest.approx(0.06)
    assert m["diff"] == pytest.approx(m["nfr_compat"] - 0.06)
    # The shared range is over the snapshots after the common start: 68-74% here.
    assert m["overlap"] == pytest.approx([0.68, 0.74]) and m["n_boot_valid"] >= 190


def test_matched_accuracy_falls_back_to_the_middle_of_the_shared_range():
    compat = snaps([START, (100, 6, 16), (200, 5, 13)])  # acc 60 -> 70 -> 68: never reaches 74
    m = fight.matched_accuracy(compat, snaps(CONTROL), n_boot=50)
    assert m["rule"] == "overlap middle" and m["overlap"] == pytest.approx([0.68, 0.70])
    assert m["acc"] == pytest.approx(0.69)
    # control at 69%: between (68%, 8%) and (74%, 6%); compat's path crosses 69% twice, at 6.4%
    # (between (60%, 10%) and (70%, 6%)) and at 5.5% (between (70%, 6%) and (68%, 5%)): the lower.
    assert m["nfr_control"] == pytest.approx(0.08 - 1 / 6 * 0.02)
    assert m["nfr_compat"] == pytest.approx(0.055)


def test_curves_sharing_only_their_start_are_not_comparable():
    """A compat run that collapsed shares v2's point with the control and nothing else: it is not
    "matched" there (the verdict says so, with McNemar's numbers)."""
    collapsed = snaps([START, (100, 40, 0), (200, 50, 0)])  # acc 60 -> 20 -> 10
    m = fight.matched_accuracy(collapsed, snaps(CONTROL), n_boot=20)
    assert m["diff"] is None and "after their common start" in m["reason"]
    v = fight.verdict(m, {"n": 60, "b": 0, "c": 40, "p": 1e-9})
    assert v["verdict"] == "not comparable" and "breaks 40" in v["why"]


def test_curves_without_common_accuracy_are_not_comparable():
    m = fight.matched_accuracy(snaps([(100, 30, 0)]), snaps(CONTROL[1:]), n_boot=20)
    assert m["acc"] is None and m["diff"] is None and m["ci"] is None and "share no accuracy" in m["reason"]
    v = fight.verdict(m, {"n": 60, "b": 30, "c": 0, "p": 1e-9})
    assert v["verdict"] == "not comparable"


def test_a_curve_that_dominates_wins_without_a_matched_point():
    """No common accuracy, but one curve is more accurate with fewer flips at every snapshot:
    it wins when McNemar agrees (a collapsed compat loses to the control the same way)."""
    better = [START, (100, 2, 20), (200, 1, 25)]  # acc 78 -> 84, NFR 2 -> 1: above the control's 68-74 / 8-6
    f = fight.fair_fight(snaps(better, reps=3), snaps(CONTROL, reps=3), n_boot=20)
    assert f["matched"]["diff"] is None
    assert f["verdict"]["verdict"] == "compat better" and "dominates" in f["verdict"]["why"]
    collapsed = [START, (100, 40, 0), (200, 50, 0)]
    f = fight.fair_fight(snaps(collapsed, reps=3), snaps(CONTROL, reps=3), n_boot=20)
    assert f["verdict"]["verdict"] == "control better"
    # Higher accuracy but more flips: neither dominates, so no claim.
    mixed = [START, (100, 9, 30), (200, 9, 35)]
    assert fight.dominance(fight.curve(snaps(mixed)), fight.curve(snaps(CONTROL))) is None
    f = fight.fair_fight(snaps(mixed, reps=3), snaps(CONTROL, reps=3), n_boot=20)
    assert f["verdict"]["verdict"] == "not comparable"


def test_lower_envelope_of_a_non_monotone_path():
    acc = np.array([[0.60, 0.70, 0.65, 0.75], [0.60, 0.70, 0.65, 0.75], [0.60, 0.70, 0.65, 0.75]])
    nfr = np.array([[0.10, 0.20, 0.05, 0.10]] * 3)
    got = fight._nfr_at(acc, nfr, np.array([0.66, 0.70, 0.80]))
    # at 66% the path crosses three times: 0.16, 0.08, 0.055 -> the lowest; at 70%: 0.2, 0.2, 0.075.
    assert got[:2] == pytest.approx([0.055, 0.075])
    assert np.isnan(got[2])  # outside the path
    flat = fight._nfr_at(np.array([[0.6, 0.6]]), np.array([[0.1, 0.07]]), np.array([0.6]))
    assert flat == pytest.approx([0.07])  # a step that does not move accuracy: its lower point


def test_bootstrap_ci_contains_the_point_and_shrinks_with_n():
    widths = []
    for reps in (1, 16):
        m = fight.matched_accuracy(snaps(COMPAT, reps=reps), snaps(CONTROL, reps=reps), n_boot=1000, seed=1)
        lo, hi = m["ci"]
        assert lo <= m["diff"] <= hi
        widths.append(hi - lo)
    assert m["diff"] == pytest.approx(0.05 - 7 / 9 * 0.01 - 0.06)  # the point does not move with n
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16)


def test_bootstrap_is_fast_for_thousands_of_instances():
    rng = np.random.default_rng(0)
    n = 3000
    old = results(rng.random(n) < 0.6)

    def run(rate: float) -> list[Snap]:
        return [
            Snap(s, compare(old, results(rng.random(n) < 0.6 + rate * s), n_boot=10)) for s in range(100, 1001, 100)
        ]

    start_snap = Snap(0, compare(old, results(rng.random(n) < 0.6), n_boot=10))
    compat, control = [start_snap, *run(5e-5)], [start_snap, *run(1e-4)]
    start = time.perf_counter()
    m = fight.matched_accuracy(compat, control, n_boot=1000)
    assert time.perf_counter() - start < 1.0  # 3000 instances x 20 snapshots x 1000 replicates
    assert m["n_boot_valid"] == 1000


def test_ids_are_aligned_and_mismatches_named():
    perm = np.random.default_rng(0).permutation(N)
    ids = np.array([f"i{k}" for k in range(N)])[perm].tolist()
    shuffled = Snap(200, compare(results(V1[perm], ids=ids), results(flipped(4, 20)[perm], ids=ids), n_boot=10))
    assert shuffled.cmp.paired.old_column("id").to_pylist() == ids  # pairs come in this v1's (shuffled) order
    old = results(V1)
    m = fight.matched_accuracy(snaps(COMPAT[:2]) + [shuffled], snaps(CONTROL), n_boot=20)
    assert m["nfr_compat"] == pytest.approx(0.05 - 7 / 9 * 0.01)

    short = Snap(200, compare(old, results(flipped(4, 20)[:90]), n_boot=10))
    with pytest.raises(MuscleError, match=r"compat step 200 and control step 0 joined different instances.*10 only"):
        fight.matched_accuracy(snaps(COMPAT[:2]) + [short], snaps(CONTROL), n_boot=20)
    other_v1 = Snap(200, compare(results(flipped(1, 0)), results(flipped(4, 20)), n_boot=10))
    with pytest.raises(MuscleError, match="compat step 200: v1's scores differ .* on 1 instances"):
        fight.matched_accuracy(snaps(COMPAT[:2]) + [other_v1], snaps(CONTROL), n_boot=20)


def test_mcnemar_counts_on_a_hand_made_case():
    v1 = np.arange(10) < 6  # v1 right on 0..5
    compat, control = v1.copy(), v1.copy()
    compat[[0, 1]] = False  # compat breaks 0, 1
    control[[1, 2, 3]] = False  # control breaks 1, 2, 3
    compat[8] = True  # a v1-wrong instance: not counted
    old = results(v1)
    r = fight.mcnemar_vs_control(compat=compare(old, results(compat)), control=compare(old, results(control)))
    assert r == {"n": 6, "b": 2, "c": 1, "both": 1, "p": stats.mcnemar_p(2, 1)}
    pooled = fight.pooled_mcnemar([r, {"n": 50, "b": 20, "c": 5, "p": 0.0}])
    assert pooled == {"b": 22, "c": 6, "n": 56, "p": stats.mcnemar_p(22, 6), "pairs": 2}


def test_mcnemar_on_continuous_scores_counts_every_instance():
    old = results(score=[0.5] * 5)
    compat = compare(old, results(score=[0.4, 0.5, 0.6, 0.3, 0.5]), n_boot=10)  # D: -.1 0 +.1 -.2 0
    control = compare(old, results(score=[0.5, 0.2, 0.4, 0.3, 0.5]), n_boot=10)  # D: 0 -.3 -.1 -.2 0
    assert compat.correct_old is None
    r = fight.mcnemar_vs_control(compat, control)
    assert (r["n"], r["b"], r["c"], r["both"]) == (5, 2, 1, 1)


def test_jaccard_chance_matches_monte_carlo():
    rng = np.random.default_rng(0)
    n, a, b, draws = 50, 10, 15, 20_000
    keys = rng.random((draws, 2, n)).argsort(axis=2)
    sa, sb = keys[:, 0, :] < a, keys[:, 1, :] < b  # independent uniform subsets of sizes a, b
    j = (sa & sb).sum(1) / (sa | sb).sum(1)
    assert abs(fight._jaccard_chance(n, a, b) - j.mean()) < 4 * j.std() / np.sqrt(draws)
    naive = a * b / n / (a + b - a * b / n)  # E|A∩B| / E|A∪B| is not E[J]
    assert abs(naive - j.mean()) > 4 * j.std() / np.sqrt(draws)
    assert fight._jaccard_chance(n, 0, 5) == 0.0 and fight._jaccard_chance(n, n, n) == 1.0


def test_flip_overlap_counts_shared_flips_against_chance():
    # three adapter seeds, each with its own v1: negative flips {0..9}, {0..4, 60..64}, {0..9}.
    cmps = []
    for extra in (False, True, False):
        v1, v2 = V1.copy(), V1.copy()
        v2[:10] = False
        if extra:
            v1[60:65] = True
            v2[5:10] = True
        cmps.append(compare(results(v1), results(v2), n_boot=10))
    o = fight.flip_overlap(cmps)
    assert o["seeds"] == 3 and o["nfr"] == pytest.approx([0.10, 0.10, 0.10])
    assert o["jaccard_pairs"] == pytest.approx([5 / 15, 1.0, 5 / 15])
    assert o["acc_v1_range"] == pytest.approx(0.05) and o["acc_v2_range"] == pytest.approx(0.05)
    assert o["jaccard_chance"] == pytest.approx(fight._jaccard_chance(N, 10, 10))
    assert o["ratio"] == pytest.approx(np.mean([1 / 3, 1, 1 / 3]) / o["jaccard_chance"]) and o["ratio"] > 5


def test_plateau_reads_the_controls_snapshots():
    control = snaps([START, (100, 10, 11), (200, 10, 10)])  # acc 60 -> 61 -> 60
    v2 = control[0].cmp
    p = fight.plateau(v2, control)
    assert (p["steps"], p["delta"], p["at_plateau"]) == (200, 0.0, True)
    assert p["max_abs_delta"] == pytest.approx(0.01)
    moving = fight.plateau(v2, snaps(CONTROL))
    assert moving["delta"] == pytest.approx(0.14) and moving["at_plateau"] is False


def test_selection_respects_the_accuracy_floor():
    val = snaps([START, (100, 5, 3), (200, 8, 9), (300, 8, 10), (400, 1, 0)])  # acc 60, 58, 61, 62, 59
    v2 = val[0].cmp
    s = fight.select_for_compat(v2, val)
    assert (s["step"], s["val_nfr"]) == (300, pytest.approx(0.08))  # ties with step 200: the later step
    assert s["val_acc"] >= v2.summary["acc_new"]
    assert fight.select_for_compat(v2, val, floor=0.005)["step"] == 300  # 59% < 60% - 0.5%
    s2 = fight.select_for_compat(v2, val, floor=0.01)  # 59% >= 60% - 1%: NFR 1% wins
    assert (s2["step"], s2["val_acc"], s2["floor"]) == (400, pytest.approx(0.59), 0.01)
    assert fight.select_for_compat(v2, val[1:2]) is None  # 58% only


def _matched(diff, ci):
    return {"acc": 0.7, "nfr_compat": 0.05, "nfr_control": 0.05 - diff, "diff": diff, "ci": ci, "level": 0.95}


@pytest.mark.parametrize(
    "diff, ci, b, c, expected",
    [
        (-0.02, [-0.03, -0.01], 40, 10, "compat better"),
        (0.02, [0.01, 0.03], 10, 40, "control better"),
        (-0.02, [-0.03, 0.001], 40, 10, "no significant difference"),  # interval touches 0
        (-0.02, [-0.03, -0.01], 12, 10, "no significant difference"),  # McNemar not significant
        (-0.02, [-0.03, -0.01], 10, 40, "no significant difference"),  # the tests disagree
    ],
)
def test_verdict_needs_both_tests(diff, ci, b, c, expected):
    v = fight.verdict(_matched(diff, ci), {"n": 300, "b": b, "c": c, "p": stats.mcnemar_p(b, c)})
    assert v["verdict"] == expected and "McNemar p=" in v["why"] and "95% CI" in v["why"]


def test_fair_fight_renders_in_the_report(tmp_path):
    compat, control = snaps(COMPAT), snaps(CONTROL)
    v2 = control[0].cmp
    f = fight.fair_fight(compat, control, n_boot=200)
    assert f["mcnemar"]["step_compat"] == 200 and f["curves"]["compat"][-1]["acc"] == pytest.approx(0.76)
    plain = task_row("acc", v2, compat[-1].cmp, control[-1].cmp)
    row = task_row(
        "acc",
        v2,
        compat[-1].cmp,
        control[-1].cmp,
        fight=f,
        plateau=fight.plateau(v2, control),
        flip_overlap=fight.flip_overlap([v2, compat[1].cmp]),
        selected={**fight.select_for_compat(v2, compat), "test": fight.point(compat[-1].cmp, 200)},
        variants={"muscle+ce": task_row("acc", v2, compat[1].cmp)},
    )
    assert set(row) - set(plain) == {"fight", "plateau", "flip_overlap", "selected", "variants"}
    assert row["both_wrong_diff"] == 0.0 and row["nfr_mc_control"] == pytest.approx(0.06)
    assert verdict(row) == f["verdict"]["verdict"]
    cmps = {"v2": v2, "compat": compat[-1].cmp, "control": control[-1].cmp}

    paths = write_report({"tasks": {"toy": mean_over_seeds([row])}}, {"toy": cmps}, tmp_path / "with")
    md = paths["md"].read_text()
    for heading in ("## Fair fight", "## Is the world fit", "## Selection for compatibility", "## Compat variants"):
        assert heading in md
    for table in md.split("\n\n"):
        if table.startswith("|"):  # every row of a table has its header's cells (no stray "|")
            assert len({line.count("|") for line in table.splitlines()}) == 1, table
    fight_row = next(line for line in md.splitlines() if line.startswith("| toy | 60.00 / 76.00 / 74.00"))
    assert "74.00" in fight_row and "| 4.22 / 6.00 |" in fight_row and f["verdict"]["verdict"] in fight_row
    assert "| toy | 200 | +14.00 | 14.00 | no |" in md  # plateau: CE moved accuracy 14 points
    assert "| toy | muscle+ce | 67.00 | 5.00 |" in md
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3 and "<h2>Fair fight" in page
    assert json.loads(paths["json"].read_text())["tasks"]["toy"]["fight"]["matched"]["acc"] == pytest.approx(0.74)

    paths = write_report({"tasks": {"toy": mean_over_seeds([plain])}}, {"toy": cmps}, tmp_path / "without")
    assert "##" not in paths["md"].read_text() and paths["html"].read_text().count("data:image/png;base64,") == 2
