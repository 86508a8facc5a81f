"""Reading JSONL result sets and real lm-eval `--log_samples` files (fixtures made by lm-eval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muscle_ray.errors import MuscleError
from muscle_ray.lmeval import lmeval_task_name
from muscle_ray.results import read_results

FIXTURES = Path(__file__).parent / "fixtures" / "lmeval"


def sample_file(side: str, task: str) -> Path:
    (path,) = (FIXTURES / side).glob(f"samples_{task}_*.jsonl")
    return path


def raw_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lmeval_multiple_choice_maps_to_results_format():
    path = sample_file("old", "tiny_mc")
    t = read_results(path)
    raw = raw_lines(path)
    assert t.num_rows == len(raw) == 12
    assert t.column("id").to_pylist() == [str(r["doc_id"]) for r in raw]
    assert set(t.column("task").to_pylist()) == {"tiny_mc"}
    assert t.column("score").to_pylist() == [r["acc"] for r in raw]
    assert t.column("correct").to_pylist() == [r["acc"] == 1.0 for r in raw]
    assert t.column("reference").to_pylist() == [r["target"] for r in raw]
    # acc is reproducible from the mapped log-likelihoods, acc_norm from them and choice_chars
    ll = t.column("choice_logliks").to_pylist()
    chars = t.column("choice_chars").to_pylist()
    gold = [int(r["target"]) for r in raw]
    assert [str(int(np.argmax(x))) for x in ll] == t.column("prediction").to_pylist()
    assert [float(np.argmax(x) == g) for x, g in zip(ll, gold)] == [r["acc"] for r in raw]
    norm = [float(np.argmax(np.array(x) / np.array(c)) == g) for x, c, g in zip(ll, chars, gold)]
    assert norm == [r["acc_norm"] for r in raw]
    assert chars[0] == [len(c) for c in raw[0]["doc"]["choices"]]


def test_lmeval_acc_norm_as_the_metric():
    path = sample_file("new", "tiny_mc")
    t = read_results(path, lmeval_metric="acc_norm")
    assert t.column("score").to_pylist() == [r["acc_norm"] for r in raw_lines(path)]


def test_lmeval_generation_maps_text():
    path = sample_file("new", "tiny_gen")
    t = read_results(path)
    raw = raw_lines(path)
    assert t.column("prediction").to_pylist() == [r["filtered_resps"][0] for r in raw]
    assert t.column("reference").to_pylist() == [r["target"] for r in raw]
    assert t.column("score").to_pylist() == [float(r["exact_match"]) for r in raw]
    assert "choice_logliks" not in t.column_names


def test_lmeval_several_filters_pick_one(tmp_path):
    raw = raw_lines(sample_file("old", "tiny_gen"))
    lines = [dict(r, filter="strict-match") for r in raw] + [
        dict(r, filter="flexible-extract", exact_match=1.0) for r in raw
    ]
    path = tmp_path / "samples_gsm8k_2024-01-01T00-00-00.000000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert lmeval_task_name(path) == "gsm8k"
    assert read_results(path).num_rows == len(raw)  # first filter only, no duplicate ids
    assert read_results(path, lmeval_filter="flexible-extract").column("score").to_pylist() == [1.0] * len(raw)


def test_results_format_rows_as_jsonl(tmp_path):
    rows = [
        {"id": "a", "task": "t", "correct": True, "score": 1.0, "prediction": "x", "reference": "x"},
        {"id": "b", "task": "t", "correct": False, "score": 0.0, "prediction": "y", "reference": "x"},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_results(path).column("id").to_pylist() == ["a", "b"]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"id": "a", "task": "t", "correct": true, "score": 1.0, "prediction": "x", "reference": "x"}\n{"id": "b", "task": "t", "correct": true, "score": NaN, "prediction": "x", "reference": "x"}\n',
            r"column 'score' is nan at row 1",
        ),
        (
            '{"id": "a", "task": "t", "correct": true, "score": 1.0, "prediction": "x", "reference": "x"}\n{"id": "a", "task": "t", "correct": true, "score": 1.0, "prediction": "x", "reference": "x"}\n',
            r"column 'id' has duplicate id 'a' at rows 0 and 1",
        ),
        ('{"id": "a", "task": "t", "correct": true, "score": 1.0, "prediction": "x"}\n', r"missing column 'reference'"),
        (
            '{"id": "a", "task": "t", "correct": true, "score": 1.0, "prediction": "x", "reference": "x"}\n{"id": "b", "task": "t", "correct": true, "score": "high", "prediction": "x", "reference": "x"}\n',
            r"column 'score' has a bad value 'high' at line 2",
        ),
        ('{"id": "a"}\nnot json\n', r"line 2 is not valid JSON"),
        ('{"doc_id": 0, "filtered_resps": []}\n', r"line 1: lm-eval sample lacks field 'doc'"),
    ],
)
def test_bad_jsonl_names_file_column_and_row(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MuscleError, match=message) as e:
        read_results(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_neither_parquet_nor_jsonl(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("id,score\na,1\n")
    with pytest.raises(MuscleError, match="neither a Parquet file nor JSON Lines"):
        read_results(path)


def test_column_subset_reads_and_validates_only_those(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"id": ["a"], "correct": [True], "score": [1.0], "prediction": ["0"]}), path)
    t = read_results(path, columns=["id", "correct", "score", "prediction"])
    assert t.column_names == ["id", "correct", "score", "prediction"]
    with pytest.raises(MuscleError, match="missing column 'reference'"):
        read_results(path, columns=["id", "score", "reference"])
