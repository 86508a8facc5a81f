"""Hand-computed cases for every flip metric, the paired statistics and the similarities."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from muscle_ray.metrics import flips, stats
from muscle_ray.metrics.compare import compare, compat_deltas
from muscle_ray.metrics.text import exact_match, rouge, similarity


def results(ids, correct, pred, score=None, ref=None):
    n = len(ids)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "task": pa.array(["t"] * n, pa.string()),
            "correct": pa.array([None if c is None else bool(c) for c in correct], pa.bool_()),
            "score": pa.array(
                score if score is not None else [float(c) if c is not None else 0.0 for c in correct], pa.float64()
            ),
            "prediction": pa.array(pred, pa.string()),
            "reference": pa.array(ref if ref is not None else ["0"] * n, pa.string()),
        }
    )


# 10 shared instances, gold answer "0". old right on a,b,c,d,e,f; new right on a,b,c,g,h.
#   a b c: both right          g h: positive flips
#   d e f: negative flips      i: both wrong, same answer; j: both wrong, different answers
OLD = results(
    list("abcdefghij") + ["x"],
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1],
    ["0", "0", "0", "0", "0", "0", "1", "2", "3", "1", "0"],
)
NEW = results(
    list("jihgfedcba") + ["y", "z"],
    [0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0],
    ["2", "3", "0", "0", "1", "2", "1", "0", "0", "0", "0", "1"],
)


def test_discrete_hand_case():
    s = compare(OLD, NEW).summary
    assert (s["n"], s["only_old"], s["only_new"]) == (10, 1, 2)
    assert s["only_old_examples"] == ["x"] and sorted(s["only_new_examples"]) == ["y", "z"]
    assert s["quadrants"] == {
        "both_right": 3,
        "positive_flip": 2,
        "both_wrong_same": 1,
        "both_wrong_different": 1,
        "negative_flip": 3,
    }
    assert s["acc_old"] == pytest.approx(0.6) and s["acc_new"] == pytest.approx(0.5)
    assert s["nfr"] == pytest.approx(0.3) and s["pfr"] == pytest.approx(0.2)
    assert s["nfr_mc"] == pytest.approx(0.4)  # 3 negative flips + j (both wrong, different)
    assert s["btc"] == pytest.approx(3 / 6)  # old right on 6, new keeps 3
    assert s["bec"] == pytest.approx(2 / 5)  # new wrong on 5, old also wrong on 2 (i, j)
    assert s["mcnemar_p"] == pytest.approx(1.0)  # b=2, c=3: exact binomial, two-sided
    assert s["kind"] == "discrete" and s["m_g"] == 1.0 and s["m_r"] == 1.0


def test_pair_aligns_by_id_in_old_order():
    p = flips.pair(OLD, NEW)
    assert p.old_column("id").to_pylist() == list("abcdefghij")
    assert p.new_column("id").to_pylist() == list("abcdefghij")
    assert p.new_column("prediction", np.array([3])).to_pylist() == ["1"]  # d: NEW row 6


def test_continuous_hand_case_and_epsilon():
    ids = list("abcde")
    old = results(ids, [None] * 5, ["x"] * 5, score=[0.5, 0.5, 0.5, 0.5, 0.2])
    new = results(ids, [None] * 5, ["y"] * 5, score=[0.9, 0.6, 0.5, 0.1, 0.15])
    s = compare(old, new).summary  # D = .4, .1, 0, -.4, -.05
    assert s["kind"] == "continuous" and s["quadrants"] is None
    assert s["pfr"] == pytest.approx(2 / 5) and s["nfr"] == pytest.approx(2 / 5)
    assert s["m_g"] == pytest.approx(0.25) and s["m_r"] == pytest.approx(0.225)
    assert s["acc_old"] == pytest.approx(0.44) and s["acc_new"] == pytest.approx(0.45)
    s = compare(old, new, epsilon=0.08).summary  # -0.05 is now a tie
    assert s["pfr"] == pytest.approx(2 / 5) and s["nfr"] == pytest.approx(1 / 5)
    assert s["m_r"] == pytest.approx(0.4)


def test_explicit_metric_recomputes_from_text():
    ids = ["1", "2", "3"]
    ref = ["the cat sat", "a dog", "red"]
    old = results(ids, [True, True, False], ["the cat sat", "a dog", "blue"], score=[1.0, 1.0, 0.0], ref=ref)
    new = results(ids, [True, True, False], [" the cat sat ", "a cat", "red"], score=[1.0, 1.0, 0.0], ref=ref)
    s = compare(old, new, metric="exact").summary  # 'score' is ignored: EM 1,1,0 -> 1,0,1
    assert s["quadrants"]["negative_flip"] == 1 and s["quadrants"]["positive_flip"] == 1
    s = compare(old, new, metric="rouge1").summary  # R1: 1,1,0 -> 1,.5,1
    assert s["kind"] == "continuous"
    assert s["nfr"] == pytest.approx(1 / 3) and s["m_r"] == pytest.approx(0.5) and s["m_g"] == pytest.approx(1.0)


def test_similarities_by_hand():
    assert exact_match(["a ", "b", None], ["a", "c", "x"]).tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(rouge(["the cat"], ["the dog"], "rouge1"), [0.5])
    np.testing.assert_allclose(rouge(["the cat sat"], ["the cat ran"], "rouge2"), [0.5])
    with pytest.raises(ValueError):
        similarity("bleu", ["a"], ["a"])


def test_bertscore_local_minilm():
    f1 = similarity(
        "bertscore",
        ["the cat sat on the mat", "the cat sat on the mat"],
        ["the cat sat on the mat", "stock prices fell sharply"],
    )
    assert f1[0] == pytest.approx(1.0, abs=1e-4) and f1[1] < 0.8
    with pytest.raises(ValueError, match="does not exist"):
        similarity("bertscore", ["a"], ["a"], bertscore_model="/no/such/model")


def test_mcnemar_exact_and_chi_square():
    assert stats.mcnemar_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # exact binomial
    assert stats.mcnemar_p(30, 10) == pytest.approx(0.0026631, rel=1e-4)  # (|30-10|-1)^2/40 = 9.025
    assert stats.mcnemar_p(0, 0) == 1.0


def test_multinomial_bootstrap_matches_row_bootstrap():
    counts = np.array([50, 15, 10, 5, 20])
    codes = np.repeat(np.arange(5), counts)
    rng = np.random.default_rng(1)
    rows = rng.choice(codes, size=(4000, len(codes)))
    row_nfr = (rows == 4).mean(axis=1)
    multi_nfr = stats.bootstrap_counts(counts, 4000, seed=1)[:, 4] / counts.sum()
    assert abs(row_nfr.mean() - multi_nfr.mean()) < 0.003
    assert abs(row_nfr.std() - multi_nfr.std()) < 0.003
    again = stats.bootstrap_counts(counts, 4000, seed=1)[:, 4] / counts.sum()
    np.testing.assert_array_equal(multi_nfr, again)  # seeded


def test_ci_contains_estimate():
    s = compare(OLD, NEW).summary
    for key, est in (("nfr", s["nfr"]), ("pfr", s["pfr"]), ("delta_acc", s["acc_new"] - s["acc_old"])):
        lo, hi = s["ci"][key]
        assert lo <= est <= hi


def test_compat_deltas_by_hand():
    base = {"nfr": 0.10, "pfr": 0.20, "acc_new": 0.70, "m_g": 0.3, "m_r": 0.2}
    comp = {"nfr": 0.06, "pfr": 0.21, "acc_new": 0.75, "m_g": 0.25, "m_r": 0.1}
    d = compat_deltas(base, comp)
    assert d["d_nfr_c"] == pytest.approx(-0.04) and d["d_pct_nfr_c"] == pytest.approx(-40.0)
    assert d["d_acc_c"] == pytest.approx(0.05) and d["d_pfr_c"] == pytest.approx(0.01)
    assert d["d_m_g"] == pytest.approx(-0.05) and d["d_m_r"] == pytest.approx(-0.1)
    assert compat_deltas({**base, "nfr": 0.0}, comp)["d_pct_nfr_c"] is None


def test_flip_table_rows():
    t = compare(OLD, NEW).flip_table()
    assert t.num_rows == 10
    quad = dict(zip(t.column("id").to_pylist(), t.column("quadrant").to_pylist()))
    assert quad["d"] == "negative_flip" and quad["g"] == "positive_flip" and quad["j"] == "both_wrong_different"


def test_duplicate_id_found_by_the_join():
    from muscle_ray.errors import MuscleError

    dup = results(["a", "b", "a"], [True, True, False], ["0", "0", "1"])
    with pytest.raises(MuscleError, match=r"new.parquet: column 'id' has duplicate id 'a' at rows 0 and 2"):
        compare(OLD, dup, names=("old.parquet", "new.parquet"))


@pytest.mark.parametrize("b, c", [(0, 1), (3, 3), (7, 2), (0, 24), (12, 12), (13, 40), (200, 170), (5, 5000)])
def test_mcnemar_matches_scipy(b, c):
    from scipy import stats as sp

    n = b + c
    if n < stats.EXACT_BELOW:
        want = sp.binomtest(min(b, c), n, 0.5).pvalue
    else:
        want = sp.chi2.sf((abs(b - c) - 1) ** 2 / n, df=1)
    assert stats.mcnemar_p(b, c) == pytest.approx(want, rel=1e-9, abs=1e-300)
