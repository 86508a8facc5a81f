"""Attack the result-set readers: whatever bytes a file holds, reading it either works or raises
one MuscleError naming the file; never another exception (a traceback in the CLI)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muscle_ray.errors import MuscleError
from muscle_ray.metrics.compare import compare
from muscle_ray.results import read_results

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5))
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)
RESULT_KEYS = ["id", "task", "correct", "score", "prediction", "reference", "choice_logliks", "choice_chars"]
LMEVAL_KEYS = ["doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "acc"]


def _read_or_user_error(path):
    try:
        table = read_results(path)
    except MuscleError as e:
        assert str(path.name) in str(e) or str(path) in str(e), f"error does not name the file: {e}"
        return None
    assert table.num_rows >= 0
    return table


def _line(keys):
    """A JSON object over some of `keys` with values of any JSON shape."""
    return st.dictionaries(st.sampled_from(keys), json_value, max_size=len(keys))


@SETTINGS
@given(lines=st.lists(_line(RESULT_KEYS), min_size=1, max_size=4))
def test_results_jsonl_of_any_shape(tmp_path, lines):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    _read_or_user_error(path)


@SETTINGS
@given(lines=st.lists(_line(LMEVAL_KEYS), min_size=1, max_size=4), arguments=json_value, resps=json_value)
def test_lmeval_samples_of_any_shape(tmp_path, lines, arguments, resps):
    path = tmp_path / "samples_arc_easy_2024-01-01T00-00-00.jsonl"
    # every line looks like an lm-eval sample (so the lm-eval reader takes it), with fields of any shape
    base = {
        "doc_id": 0,
        "doc": {},
        "target": "0",
        "arguments": arguments,
        "resps": [],
        "filtered_resps": resps,
        "filter": "none",
        "metrics": ["acc"],
        "acc": 1.0,
    }
    path.write_text("".join(json.dumps({**base, **r}) + "\n" for r in lines))
    _read_or_user_error(path)


@SETTINGS
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes(tmp_path, data):
    for name in ("r.jsonl", "r.parquet", "r"):
        path = tmp_path / name
        path.write_bytes(data)
        _read_or_user_error(path)


COLUMN_TYPES = [pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.list_(pa.float64()), pa.list_(pa.string())]


def _value(typ: pa.DataType, k: int, unique: bool):
    """A value of `typ`; distinct per k where the type allows it (ids)."""
    if typ == pa.string():
        return str(k) if unique else "1"
    if typ == pa.int64():
        return k if unique else 1
    if typ == pa.float64():
        return float(k) if unique else 1.0
    if typ == pa.bool_():
        return True
    return [1.0] if typ == pa.list_(pa.float64()) else ["a"]


@SETTINGS
@given(
    shards=st.lists(
        st.dictionaries(st.sampled_from(RESULT_KEYS), st.sampled_from(COLUMN_TYPES), min_size=1), min_size=1, max_size=3
    ),
    rows=st.integers(0, 3),
)
def test_parquet_shards_of_any_schema(tmp_path, shards, rows):
    """Shards whose columns have any of these types: read, cast to the contract, or refused in one line."""
    d = tmp_path / "set"
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    for i, schema in enumerate(shards):
        cols = {}
        for name, typ in schema.items():
            values = [_value(typ, i * 10 + r, unique=name == "id") for r in range(rows)]
            cols[name] = pa.array(values, typ)
        pq.write_table(pa.table(cols), d / f"shard-{i}.parquet")
    _read_or_user_error(d)


@pytest.mark.parametrize("old_ids,new_ids", [([], []), (["a"], ["b"]), (["a", "b"], [])])
def test_nothing_joins_is_a_user_error(old_ids, new_ids):
    def table(ids):
        n = len(ids)
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "task": ["t"] * n,
                "correct": [True] * n,
                "score": [1.0] * n,
                "prediction": ["0"] * n,
                "reference": ["0"] * n,
            }
        )

    with pytest.raises(MuscleError, match="share no instance id"):
        compare(table(old_ids), table(new_ids), n_boot=10)


def test_different_tasks_are_refused_unless_allowed():
    def table(task):
        return pa.table(
            {
                "id": ["1", "2"],
                "task": [task] * 2,
                "correct": [True, False],
                "score": [1.0, 0.0],
                "prediction": ["0", "1"],
                "reference": ["0", "0"],
            }
        )

    with pytest.raises(MuscleError, match=r"task \['arc_easy'\].*task \['piqa'\]"):
        compare(table("arc_easy"), table("piqa"), n_boot=10)
    assert compare(table("arc_easy"), table("piqa"), n_boot=10, allow_task_mismatch=True).summary["n"] == 2
