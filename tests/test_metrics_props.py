"""Property tests (hypothesis) for the flip metrics' invariants."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muscle_ray.metrics import flips
from muscle_ray.metrics.compare import compare

# Per instance: the gold option and each model's chosen option (4-way multiple choice).
instances = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60)


def tables(rows):
    gold, a, b = (np.array(x) for x in zip(*rows))
    ids = [f"q{i}" for i in range(len(rows))]

    def side(pred):
        correct = pred == gold
        return pa.table(
            {
                "id": ids,
                "task": ["t"] * len(ids),
                "correct": pa.array(correct),
                "score": pa.array(correct.astype(float)),
                "prediction": pa.array(pred.astype(str)),
                "reference": pa.array(gold.astype(str)),
            }
        )

    return side(a), side(b)


@settings(max_examples=60, deadline=None)
@given(instances)
def test_invariants(rows):
    old, new = tables(rows)
    s = compare(old, new, n_boot=50).summary
    back = compare(new, old, n_boot=50).summary
    assert s["nfr"] <= s["nfr_mc"] + 1e-12
    assert s["acc_new"] - s["acc_old"] == pytest.approx(s["pfr"] - s["nfr"])
    assert back["nfr"] == pytest.approx(s["pfr"]) and back["pfr"] == pytest.approx(s["nfr"])
    assert sum(s["quadrants"].values()) == s["n"] == len(rows)
    # With S = correctness the continuous formulas reduce to the discrete ones.
    assert s["continuous"]["nfr"] == pytest.approx(s["nfr"]) and s["continuous"]["pfr"] == pytest.approx(s["pfr"])
    assert s["continuous"]["score_old"] == pytest.approx(s["acc_old"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=60), st.floats(0, 0.5))
def test_continuous_identities(pairs, eps):
    s_old, s_new = (np.array(x) for x in zip(*pairs))
    c = flips.continuous_metrics(s_old, s_new, eps, n_boot=20)
    d = s_new - s_old
    # mean(D) = PFR*m_g - NFR*m_r - (mass of ties inside ±eps)
    tie = d[np.abs(d) <= eps].sum() if eps else 0.0
    total = (c["pfr"] * (c["m_g"] or 0.0)) - (c["nfr"] * (c["m_r"] or 0.0)) + tie / len(d)
    assert total == pytest.approx(d.mean(), abs=1e-9)
    swapped = flips.continuous_metrics(s_new, s_old, eps, n_boot=20)
    assert swapped["nfr"] == pytest.approx(c["pfr"]) and swapped["pfr"] == pytest.approx(c["nfr"])
    assert (swapped["m_r"] is None) == (c["m_g"] is None)
    if c["m_g"] is not None:
        assert swapped["m_r"] == pytest.approx(c["m_g"])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 1000), min_size=1, max_size=40, unique=True),
    st.lists(st.integers(0, 1000), min_size=1, max_size=40, unique=True),
)
def test_join_counts_every_id(a, b):
    mk = lambda xs: pa.table({"id": [str(x) for x in xs], "v": xs})  # noqa: E731
    old, new = mk(a), mk(b)
    p = flips.pair(old, new)
    shared = set(a) & set(b)
    assert p.n == len(shared) and p.only_old == len(set(a) - shared) and p.only_new == len(set(b) - shared)
    assert p.old_column("id").to_pylist() == p.new_column("id").to_pylist()
    assert p.old_column("v").to_pylist() == p.new_numpy("v").tolist()  # rows aligned
    assert p.old_rows.tolist() == sorted(p.old_rows.tolist())  # OLD's order
