"""Attack `muscle flips` where a user meets it, the command line: whatever two (or three) files hold
and whichever flags are given, it exits 0, or 2 with one line on stderr; never a traceback.

tests/test_readers_fuzz.py attacks the readers alone; this one goes through the whole command
(reading, joining, the statistics, the table or JSON, `--out`), with files that mostly read well,
so the comparison itself sees odd values: NaN and infinite scores, nulls, one row, no shared id.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muscle_ray.cli import main

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

IDS = st.sampled_from(["0", "1", "2", "3", "4", "a", "é"])  # lm-eval doc_ids read as "0", "1", ...
TEXT = st.one_of(st.sampled_from(["0", "1", "2", " 1 ", "yes", ""]), st.text(max_size=6))
ODD = {  # a value of the wrong kind or out of range, per field
    "id": st.one_of(st.none(), st.integers(0, 3), st.just("")),
    "task": st.one_of(st.none(), st.integers(0, 1), st.just("u")),
    "correct": st.one_of(st.none(), st.sampled_from([0, 1, "true"])),
    "score": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.just("1")),
    "prediction": st.one_of(st.none(), st.integers(0, 3)),
    "reference": st.one_of(st.none(), st.integers(0, 3)),
}

EMPTY = pa.table(
    {
        "id": pa.array([], pa.string()),
        "task": pa.array([], pa.string()),
        "correct": pa.array([], pa.bool_()),
        "score": pa.array([], pa.float64()),
        "prediction": pa.array([], pa.string()),
        "reference": pa.array([], pa.string()),
    }
)


@st.composite
def result_rows(draw) -> list[dict]:
    """Well-formed rows most of the time (so the comparison runs on odd but valid sets: one row,
    all wrong, ties, scores in (0, 1)), now and then with a field dropped or given an odd value."""
    ids = draw(
        st.lists(IDS, min_size=draw(st.sampled_from([1, 1, 1, 0])), max_size=6, unique=draw(st.integers(0, 5)) > 0)
    )
    continuous = draw(st.booleans())
    rows = []
    for i in ids:
        correct = draw(st.booleans())
        score = draw(st.floats(0, 1)) if continuous else float(correct)
        rows.append(
            {
                "id": i,
                "task": "t",
                "correct": correct,
                "score": score,
                "prediction": draw(TEXT),
                "reference": draw(TEXT),
            }
        )
    if rows and draw(st.integers(0, 3)) == 0:
        row, name = draw(st.sampled_from(rows)), draw(st.sampled_from(sorted(ODD)))
        if draw(st.booleans()):
            row[name] = draw(ODD[name])
        else:
            del row[name]
    return rows


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows: list[dict]) -> str:
    try:
        table = pa.Table.from_pylist(rows) if rows else EMPTY
    except (pa.ArrowException, TypeError, ValueError):  # mixed types in a column: store them as text
        table = pa.Table.from_pylist([{k: json.dumps(v) for k, v in r.items()} for r in rows])
    pq.write_table(table, path)
    return str(path)


def write_lmeval(path, rows: list[dict], doc_ids) -> str:
    """lm-eval `--log_samples` lines built from the rows' values (any shape where it counts)."""
    lines = [
        {
            "doc_id": d,
            "doc": {},
            "target": r.get("reference"),
            "arguments": [[r.get("prediction"), " x"]],
            "resps": [],
            "filtered_resps": [r.get("prediction")],
            "filter": "none",
            "metrics": ["acc"],
            "acc": r.get("score"),
        }
        for r, d in zip(rows, doc_ids)
    ]
    return write_jsonl(path, lines)


@st.composite
def result_file(draw, tmp_path, name: str) -> str:
    # mostly files that read, now and then one that cannot (bytes, a missing path)
    form = draw(st.sampled_from(["parquet"] * 3 + ["jsonl"] * 3 + ["lmeval"] * 2 + ["dir", "bytes", "missing"]))
    rows = draw(result_rows())
    if form == "parquet":
        return write_parquet(tmp_path / f"{name}.parquet", rows)
    if form == "jsonl":
        return write_jsonl(tmp_path / f"{name}.jsonl", rows)
    if form == "lmeval":
        doc_ids = draw(
            st.lists(
                st.one_of(st.integers(0, 4), st.text(max_size=2)), min_size=len(rows), max_size=len(rows), unique=True
            )
        )
        (tmp_path / name).mkdir()
        return write_lmeval(tmp_path / name / "samples_t_2024-01-01T00-00-00.jsonl", rows, doc_ids)
    if form == "bytes":
        path = tmp_path / f"{name}{draw(st.sampled_from(['.jsonl', '.parquet', '']))}"
        path.write_bytes(draw(st.binary(max_size=40)))
        return str(path)
    if form == "dir":
        d = tmp_path / name
        d.mkdir()
        write_parquet(d / "shard-0.parquet", rows)
        if draw(st.booleans()):
            write_parquet(d / "shard-1.parquet", draw(result_rows()))
        return str(d)
    return str(tmp_path / f"{name}.parquet")  # no such file


FLAGS = st.lists(
    st.sampled_from(
        [
            ["--json"],
            ["--metric", "exact"],
            ["--metric", "rouge1"],
            ["--epsilon", "0.5"],
            ["--allow-task-mismatch"],
            ["--lmeval-metric", "acc"],
            ["--lmeval-filter", "none"],
            ["--seed", "3"],
        ]
    ),
    max_size=3,
)


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


@SETTINGS
@given(data=st.data(), flags=FLAGS, with_compat=st.booleans(), with_out=st.booleans())
def test_flips_exits_0_or_2_with_one_line(tmp_path_factory, data, flags, with_compat, with_out):
    tmp = tmp_path_factory.mktemp("fuzz")
    old = data.draw(result_file(tmp, "old"))
    new = data.draw(result_file(tmp, "new"))
    argv = ["flips", old, new, "--bootstrap", "20", *(f for pair in flags for f in pair)]
    if with_compat:
        argv += ["--compat", data.draw(result_file(tmp, "compat"))]
    if with_out:
        argv += ["--out", str(tmp / "report")]
    rc, err = run_cli(argv)  # any other exception fails the test with its traceback
    assert rc in (0, 2)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("muscle flips: error: "), err
