"""The fast paths of `muscle flips` against the straightforward ones, on random inputs.

- Answers read dictionary-encoded (each row group with its own dictionary) compare as integer
  codes (`compare._same_predictions`): summary and flip table must equal those of the same
  tables with plain string answers, with nulls, duplicate and one-sided ids in the mix.
- Bool and number columns go to numpy straight from the Arrow buffers (`flips.as_numpy`):
  equal to Arrow's own conversion, nulls as False / 0.
- The reader asks for a dictionary only where every shard stores the column so (no plain
  pages to hash back), and all shards of a result set come with one type.
- The command imports no pandas (Arrow's `to_numpy` and `pa.array` would: 0.3-0.5 s).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muscle_ray.errors import MuscleError
from muscle_ray.metrics import flips
from muscle_ray.metrics.compare import compare
from muscle_ray.results import read_results

IDS = [f"q{i}" for i in range(12)] + ["", "é", "Mercury_SC_0"]
ANSWERS = st.one_of(st.none(), st.sampled_from(["0", "1", "2", "é", ""]))


@st.composite
def result_side(draw) -> dict:
    """Rows of one result set (ids mostly unique, now and then one twice) and how its answers
    are split into chunks, each dictionary-encoded on its own."""
    ids = draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=10, unique=True))
    if draw(st.integers(0, 7)) == 0:
        ids.append(draw(st.sampled_from(ids)))
    n = len(ids)
    return {
        "ids": ids,
        "correct": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        "answers": draw(st.lists(ANSWERS, min_size=n, max_size=n)),
        "cuts": sorted(draw(st.lists(st.integers(0, n), max_size=3))),
        "null_entry": draw(st.booleans()),  # a null stored as an entry of the dictionary
        "seed": draw(st.integers(0, 2**16)),
    }


def plain_table(side: dict) -> pa.Table:
    n = len(side["ids"])
    return pa.table(
        {
            "id": pa.array(side["ids"], pa.string()),
            "task": pa.array(["t"] * n, pa.string()),
            "correct": pa.array(side["correct"], pa.bool_()),
            "score": pa.array([float(c) for c in side["correct"]], pa.float64()),
            "prediction": pa.array(side["answers"], pa.string()),
            "reference": pa.array(["0"] * n, pa.string()),
        }
    )


def encoded_answers(side: dict) -> pa.ChunkedArray:
    """The answers in chunks, each with its own dictionary in its own (shuffled) order, as a
    Parquet reader hands over one per row group."""
    rng = np.random.default_rng(side["seed"])
    answers, bounds = side["answers"], [0, *side["cuts"], len(side["answers"])]
    chunks = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = answers[start:stop]
        values: list = sorted({a for a in part if a is not None}, key=lambda _: rng.random())
        if side["null_entry"]:
            values.insert(int(rng.integers(0, len(values) + 1)), None)
        index = [values.index(a) if a is not None or side["null_entry"] else None for a in part]
        chunks.append(pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), pa.array(values, pa.string())))
    return pa.chunked_array(chunks, pa.dictionary(pa.int32(), pa.string()))


def outcome(old: pa.Table, new: pa.Table):
    try:
        cmp = compare(old, new, n_boot=20, seed=1)
    except MuscleError as e:
        return str(e), None
    return cmp.summary, cmp.flip_table()


@settings(max_examples=150, deadline=None)
@given(result_side(), result_side())
def test_dictionary_answers_compare_like_strings(old, new):
    plain = outcome(plain_table(old), plain_table(new))
    encoded = [plain_table(side) for side in (old, new)]
    encoded = [
        t.set_column(t.schema.get_field_index("prediction"), "prediction", encoded_answers(side))
        for t, side in zip(encoded, (old, new))
    ]
    assert pa.types.is_dictionary(encoded[0].column("prediction").type)
    fast = outcome(*encoded)
    assert fast[0] == plain[0]
    if plain[1] is not None:
        assert fast[1].schema == plain[1].schema
        assert fast[1].equals(plain[1])


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([pa.bool_(), pa.int8(), pa.int32(), pa.int64(), pa.uint16(), pa.float32(), pa.float64()]),
    st.lists(st.one_of(st.none(), st.integers(0, 100)), max_size=40),
    st.lists(st.integers(0, 40), max_size=3),
)
def test_as_numpy_matches_arrow(typ, values, cuts):
    zero = False if typ == pa.bool_() else 0
    values = [None if v is None else (v % 3 == 0) if typ == pa.bool_() else v for v in values]
    full = pa.array([zero, *values, zero], typ).slice(1, len(values))  # a non-zero offset
    bounds = [0, *sorted(min(c, len(values)) for c in cuts), len(values)]
    column = pa.chunked_array([full.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])], typ)
    got = flips.as_numpy(column)
    want = np.array([zero if v is None else v for v in values])
    assert got.dtype == np.dtype(typ.to_pandas_dtype()) and len(got) == len(values)
    assert got.tolist() == want.astype(got.dtype).tolist()
    assert flips.as_numpy(full).tolist() == got.tolist()


@pytest.mark.parametrize(
    "values", [np.arange(7, dtype=np.int64), np.arange(7, dtype=np.uint32)[::2], np.linspace(0, 1, 5)]
)
def test_as_arrow_round_trip(values):
    arrow = flips.as_arrow(values)
    assert arrow.to_pylist() == values.tolist() and arrow.type == pa.from_numpy_dtype(values.dtype)
    with pytest.raises(TypeError):
        flips.as_arrow(values > 0)


def write(path, answers: list, **options) -> None:
    n = len(answers)
    table = pa.table(
        {
            "id": [f"q{i}" for i in range(n)],
            "task": ["t"] * n,
            "correct": [i % 2 == 0 for i in range(n)],
            "score": [float(i % 2 == 0) for i in range(n)],
            "prediction": pa.array(answers, pa.string()),
            "reference": ["0"] * n,
        }
    )
    pq.write_table(table, path, **options)


def test_reader_asks_for_a_dictionary_only_where_every_shard_stores_one(tmp_path):
    few = [str(i % 4) if i % 9 else None for i in range(3000)]  # '0'..'3' and nulls
    write(tmp_path / "few.parquet", few, row_group_size=1000)
    got = read_results(tmp_path / "few.parquet", dictionary=["prediction"])
    assert pa.types.is_dictionary(got.column("prediction").type) and got.column("prediction").num_chunks == 3
    assert got.column("prediction").cast(pa.string()).to_pylist() == few
    assert read_results(tmp_path / "few.parquet").column("prediction").type == pa.string()  # not asked
    # plain pages: written so, or fallen back from a dictionary past the writer's 1 MiB limit
    many = [f"generated answer {i:09d}" for i in range(120_000)]
    write(tmp_path / "plain.parquet", few, use_dictionary=False)
    write(tmp_path / "fell_back.parquet", many)
    for name in ("plain", "fell_back"):
        got = read_results(tmp_path / f"{name}.parquet", dictionary=["prediction"])
        assert got.column("prediction").type == pa.string(), name
    both = tmp_path / "both"
    both.mkdir()
    write(both / "a.parquet", few)
    write(both / "b.parquet", few, use_dictionary=False)
    got = read_results(both, dictionary=["prediction"], unique_ids=False)
    assert got.column("prediction").type == pa.string() and got.column("prediction").to_pylist() == few + few


def test_flips_imports_no_pandas(tmp_path):
    write(tmp_path / "old.parquet", ["0", "1", "2", None] * 5)
    write(tmp_path / "new.parquet", ["0", "2", "2", "1"] * 5)
    code = (
        "import sys; from muscle_ray.cli import main; "
        f"rc = main(['flips', {str(tmp_path / 'old.parquet')!r}, {str(tmp_path / 'new.parquet')!r}, '--json']); "
        "print(rc, 'pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 False"
