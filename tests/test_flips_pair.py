"""The fast id join (`flips.pair`) and `compare` against plain-Python references on random tables.

`pair` joins on 64-bit hashes of the ids and confirms every pair on the bytes, so it must agree
with a dict join exactly: same pairs in OLD's order, same unmatched counts and examples, the
same duplicate-id error. The tables mix what breaks hash joins: ids of 0 to 40 bytes (one word
and several), multibyte UTF-8, NUL bytes, shared prefixes, int ids, several chunks, sliced and
dictionary-encoded columns; and the hash is also replaced by one that collides on purpose.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from muscle_ray.errors import MuscleError
from muscle_ray.metrics import flips, stats
from muscle_ray.metrics.compare import compare

ALPHABET = ["a", "b", "é", "\x00", "7", "_"]


def random_ids(rng: np.random.Generator, k: int) -> list:
    """k distinct ids: strings of 0-40 characters sharing prefixes, or (sometimes) ints."""
    if rng.random() < 0.2:
        return [int(x) for x in rng.choice(10 * k + 10, size=k, replace=False)]
    ids: set[str] = set()
    while len(ids) < k:
        prefix = "Mercury_SC_" if rng.random() < 0.3 else ""
        n = int(rng.choice([0, 1, 7, 8, 9, 15, 16, 17, 40]))
        ids.add(prefix + "".join(rng.choice(ALPHABET, size=n)))
    return sorted(ids, key=lambda _: rng.random())


def side(rng: np.random.Generator, universe: list, duplicates: bool) -> list:
    """A random subset of the ids, shuffled; with `duplicates`, some ids twice."""
    ids = [i for i in universe if rng.random() < 0.7]
    if duplicates and ids:
        ids += list(rng.choice(np.array(ids, dtype=object), size=int(rng.integers(1, 3))))
    return [ids[i] for i in rng.permutation(len(ids))]


def as_table(ids: list, rng: np.random.Generator, continuous: bool = False) -> pa.Table:
    """Results for these ids, stored in one of the layouts a reader can hand over."""
    layout = rng.integers(0, 4)
    pad = 3 if layout == 3 and ids else 0  # the table is a slice of a bigger one
    ids = ids[:1] * pad + ids
    n = len(ids)
    correct = rng.random(n) < 0.6
    score = rng.random(n).round(1) if continuous else correct.astype(np.float64)
    id_col = pa.array(ids, pa.int64() if ids and isinstance(ids[0], int) else pa.string())
    table = pa.table(
        {
            "id": id_col,
            "task": pa.array(["t"] * n, pa.string()),
            "correct": pa.array([None if continuous and rng.random() < 0.2 else bool(c) for c in correct]),
            "score": pa.array(score, pa.float64()),
            "prediction": pa.array([str(x) if x < 3 else None for x in rng.integers(0, 4, size=n)], pa.string()),
            "reference": pa.array(["0"] * n, pa.string()),
        }
    )
    if pad:
        return table.slice(pad)
    if layout == 1 and n > 2:  # several chunks, the later ones slices with a non-zero offset
        cut = int(rng.integers(1, n))
        return pa.concat_tables([table.slice(0, cut), table.slice(cut)])
    if layout == 2 and pa.types.is_string(id_col.type):  # ids read dictionary-encoded
        return table.set_column(0, "id", id_col.dictionary_encode())
    return table


def reference_pair(old_ids: list, new_ids: list) -> tuple[list, list, int, int, list, list]:
    """A dict join: (old rows, new rows) in OLD's order, unmatched counts and first examples."""
    for name, ids in (("OLD", old_ids), ("NEW", new_ids)):
        counts = Counter(ids)
        dup = [r for r, i in enumerate(ids) if counts[i] > 1]
        if dup:
            second = next(r for r in dup[1:] if ids[r] == ids[dup[0]])
            raise MuscleError(f"{name}: column 'id' has duplicate id {ids[dup[0]]!r} at rows {dup[0]} and {second}")
    where = {i: r for r, i in enumerate(new_ids)}
    old_rows = [r for r, i in enumerate(old_ids) if i in where]
    new_rows = [where[old_ids[r]] for r in old_rows]
    matched = set(new_rows)
    only_old = [i for i in old_ids if i not in where]
    only_new = [i for r, i in enumerate(new_ids) if r not in matched]
    return old_rows, new_rows, len(only_old), len(only_new), only_old[:5], only_new[:5]


def outcome(fn, *args):
    try:
        return fn(*args)
    except MuscleError as e:
        return str(e)


def fast_pair(old: pa.Table, new: pa.Table):
    p = flips.pair(old, new)
    examples = [p.only_old_examples, p.only_new_examples]
    return p.old_rows.tolist(), p.new_rows.tolist(), p.only_old, p.only_new, *examples


def check_pair_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    universe = random_ids(rng, int(rng.integers(0, 60)))
    old_ids = side(rng, universe, duplicates=rng.random() < 0.25)
    new_ids = list(old_ids) if rng.random() < 0.2 else side(rng, universe, duplicates=rng.random() < 0.25)
    expected = outcome(reference_pair, old_ids, new_ids)
    assert outcome(fast_pair, as_table(old_ids, rng), as_table(new_ids, rng)) == expected


@pytest.mark.parametrize("seed", range(60))
def test_pair_matches_a_dict_join(seed, monkeypatch):
    monkeypatch.setattr(flips._Ids, "BLOCK", [1 << 16, 1, 3, 8][seed % 4])  # several blocks a chunk
    check_pair_matches_reference(seed)


@pytest.mark.parametrize("block", [1 << 13, 1, 5, 64])
def test_fingerprints_do_not_depend_on_layout(block, monkeypatch):
    # A value's hash depends on its bytes alone: not on its chunk, its block, or how long its
    # neighbours are (a few long ids in a block are hashed on their own).
    rng = np.random.default_rng(7)
    ids = [str(i) for i in random_ids(rng, 200)] + ["x" * 1000, "y" * 999 + "é", "q" * 64]
    one = flips._Ids(pa.table({"id": pa.array(ids)}), "one")
    want = np.empty(len(ids), np.uint64)
    one.fingerprints(want)
    assert len(set(want.tolist())) == len(ids)
    monkeypatch.setattr(flips._Ids, "BLOCK", block)
    for layout in range(8):
        table = as_table(ids, np.random.default_rng(layout))
        got = np.empty(len(ids), np.uint64)
        flips._Ids(table, "other").fingerprints(got)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("seed", range(30))
def test_pair_stays_exact_when_hashes_collide(seed, monkeypatch):
    # The real hash cut down to m values: different ids share a hash, alone as an OLD-NEW
    # twosome (only the byte comparison tells them apart) or in bigger groups (the exact path).
    fingerprints, m = flips._Ids.fingerprints, np.uint64([2, 7, 30, 200, 5000][seed % 5])

    def colliding(self, out):
        fingerprints(self, out)
        out %= m
        out <<= np.uint64(50)

    monkeypatch.setattr(flips._Ids, "fingerprints", colliding)
    check_pair_matches_reference(seed)


@pytest.mark.parametrize(
    "old_ids, new_ids, pairs",
    [
        (["ab", "abc"], ["abc", "ba"], ([1], [0])),  # most OLD rows paired: NEW's ids taken in OLD's order
        (["ab", "c", "dddd", "eeeee", "ffffff"], ["ba", "eeeee"], ([3], [1])),  # few: both sides taken
    ],
)
def test_pair_confirms_a_shared_hash_on_the_bytes(old_ids, new_ids, pairs, monkeypatch):
    # Every id of one length shares a hash: "ab" (OLD) and "ba" (NEW) form a group of two
    # that only the byte comparison tells apart.
    def by_length(self, out):
        out[:] = pc.binary_length(self.strings).to_numpy().astype(np.uint64) << np.uint64(50)

    monkeypatch.setattr(flips._Ids, "fingerprints", by_length)
    rng = np.random.default_rng(0)
    p = flips.pair(as_table(old_ids, rng), as_table(new_ids, rng))
    assert (p.old_rows.tolist(), p.new_rows.tolist()) == pairs
    assert "ab" in p.only_old_examples and p.only_new_examples == ["ba"]


def test_pair_on_empty_and_one_sided_tables():
    rng = np.random.default_rng(0)
    for old_ids, new_ids in (([], []), (["a"], []), ([], ["a", "b"]), (["", "a"], ["", "b"])):
        expected = reference_pair(old_ids, new_ids)
        assert fast_pair(as_table(old_ids, rng), as_table(new_ids, rng)) == expected


def test_pair_refuses_a_null_id():
    table = pa.table({"id": pa.array(["a", None], pa.string())})
    with pytest.raises(MuscleError, match="NEW: column 'id' is null at row 1"):
        flips.pair(pa.table({"id": pa.array(["a"], pa.string())}), table)


def reference_summary(old: pa.Table, new: pa.Table) -> dict:
    """The flip metrics by hand, row by row over the dict join (compare's default: the score column)."""
    o, n = old.to_pylist(), new.to_pylist()
    old_rows, new_rows, *_ = reference_pair([r["id"] for r in o], [r["id"] for r in n])
    rows = [(o[a], n[b]) for a, b in zip(old_rows, new_rows)]
    d = [b["score"] - a["score"] for a, b in rows]
    improved, regressed = [x for x in d if x > 0], [-x for x in d if x < 0]
    out = {
        "n": len(rows),
        "pfr": len(improved) / len(rows),
        "nfr": len(regressed) / len(rows),
        "m_g": float(np.mean(improved)) if improved else None,
        "m_r": float(np.mean(regressed)) if regressed else None,
        "score_old": float(np.mean([a["score"] for a, _ in rows])),
        "score_new": float(np.mean([b["score"] for _, b in rows])),
        "delta_score_ci": stats.bootstrap_mean_ci(np.array(d), 50, 0),
    }
    if any(a["correct"] is None or b["correct"] is None for a, b in rows):
        out["kind"] = "continuous"
        return out
    same = [a["prediction"] is not None and a["prediction"] == b["prediction"] for a, b in rows]
    q = Counter()
    for (a, b), s in zip(rows, same):
        ca, cb = a["correct"], b["correct"]
        q["both_right" if ca and cb else "positive_flip" if cb else "negative_flip" if ca else f"both_wrong_{s}"] += 1
    old_right, new_wrong = q["both_right"] + q["negative_flip"], len(rows) - q["both_right"] - q["positive_flip"]
    both_wrong = q["both_wrong_True"] + q["both_wrong_False"]
    out |= {
        "kind": "discrete",
        "quadrants": {
            "both_right": q["both_right"],
            "positive_flip": q["positive_flip"],
            "both_wrong_same": q["both_wrong_True"],
            "both_wrong_different": q["both_wrong_False"],
            "negative_flip": q["negative_flip"],
        },
        "nfr_mc": sum(not b["correct"] and not s for (_, b), s in zip(rows, same)) / len(rows),
        "btc": q["both_right"] / old_right if old_right else None,
        "bec": both_wrong / new_wrong if new_wrong else None,
    }
    return out


@pytest.mark.parametrize("seed", range(30))
def test_compare_matches_the_metrics_by_hand(seed):
    rng = np.random.default_rng(1000 + seed)
    universe = random_ids(rng, int(rng.integers(2, 50)))
    continuous = bool(rng.random() < 0.5)
    old_ids, new_ids = side(rng, universe, False) + [universe[0]], side(rng, universe, False) + [universe[0]]
    old_ids, new_ids = list(dict.fromkeys(old_ids)), list(dict.fromkeys(new_ids))
    old, new = as_table(old_ids, rng, continuous), as_table(new_ids, rng, continuous)
    want = reference_summary(old, new)
    got = compare(old, new, n_boot=50, seed=0).summary
    cont = got["continuous"]
    assert (got["n"], got["kind"]) == (want["n"], want["kind"])
    for key in ("pfr", "nfr", "m_g", "m_r", "score_old", "score_new"):
        assert close(cont[key], want[key]), key
    if want["kind"] == "continuous":
        assert close(got["ci"]["delta_acc"], want["delta_score_ci"])
        return
    assert got["quadrants"] == want["quadrants"]
    for key in ("nfr_mc", "btc", "bec"):
        assert close(got[key], want[key]), key


def close(a, b) -> bool:
    return a is None and b is None or (a is not None and b is not None and a == pytest.approx(b, rel=1e-12))
