"""`muscle flips` end to end: real files in, table / JSON / Parquet / PNG out, exit code 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muscle_ray.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "lmeval"
KEYS = {
    "n",
    "only_old",
    "only_new",
    "acc_old",
    "acc_new",
    "nfr",
    "pfr",
    "nfr_mc",
    "quadrants",
    "btc",
    "bec",
    "m_g",
    "m_r",
    "mcnemar_p",
    "ci",
}


def fixture(side: str, task: str) -> str:
    (path,) = (FIXTURES / side).glob(f"samples_{task}_*.jsonl")
    return str(path)


def write(path: Path, ids, correct, pred, score=None, ref=None) -> str:
    n = len(ids)
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "task": ["t"] * n,
                "correct": pa.array([bool(c) for c in correct], pa.bool_()),
                "score": pa.array(score or [float(c) for c in correct], pa.float64()),
                "prediction": pred,
                "reference": ref or ["0"] * n,
            }
        ),
        path,
    )
    return str(path)


@pytest.fixture
def three(tmp_path):
    old = write(tmp_path / "old.parquet", list("abcdef"), [1, 1, 1, 0, 0, 1], list("000120"))
    new = write(tmp_path / "new.parquet", list("abcdeg"), [1, 0, 0, 1, 0, 1], list("012030"))
    compat = write(tmp_path / "compat.parquet", list("abcdef"), [1, 1, 0, 1, 0, 1], list("002010"))
    return old, new, compat


def test_json_summary(three, capsys):
    old, new, _ = three
    assert main(["flips", old, new, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert KEYS <= set(s)
    assert (s["n"], s["only_old"], s["only_new"]) == (5, 1, 1)
    assert s["nfr"] == pytest.approx(2 / 5) and s["pfr"] == pytest.approx(1 / 5)
    assert s["quadrants"]["both_wrong_different"] == 1  # e: old '2', new '3'
    assert set(s["ci"]) == {"delta_acc", "nfr", "pfr"}


def test_no_bootstrap_leaves_the_intervals_out(three, capsys):
    old, new, _ = three
    assert main(["flips", old, new, "--json", "--bootstrap", "0"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["ci"] == {"delta_acc": None, "nfr": None, "pfr": None} and s["nfr"] == pytest.approx(2 / 5)
    assert main(["flips", old, new, "--bootstrap", "0"]) == 0  # the table without its CI columns


def test_row_groups_read_in_parallel_keep_row_order(tmp_path, capsys):
    from muscle_ray.results import read_results

    n = 50
    table = pa.table(
        {
            "id": [f"q{i}" for i in range(n)],
            "task": ["t"] * n,
            "correct": [i % 3 == 0 for i in range(n)],
            "score": [float(i % 3 == 0) for i in range(n)],
            "prediction": [str(i % 4) for i in range(n)],
            "reference": ["0"] * n,
        }
    )
    path = tmp_path / "groups.parquet"
    pq.write_table(table, path, row_group_size=7)
    assert pq.ParquetFile(path).num_row_groups == 8
    got = read_results(path)
    assert got.column("id").to_pylist() == table.column("id").to_pylist()
    assert got.select(["correct", "score", "prediction"]).equals(table.select(["correct", "score", "prediction"]))
    assert main(["flips", str(path), str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == n


def test_memory_settings_come_back(three, capsys):
    pool = pa.default_memory_pool().backend_name  # `muscle flips` runs on malloc, then puts it back
    assert main(["flips", three[0], three[1], "--json"]) == 0
    assert pa.default_memory_pool().backend_name == pool


def test_table_compat_and_out(three, tmp_path, capsys):
    old, new, compat = three
    out = tmp_path / "report"
    assert main(["flips", old, new, "--compat", compat, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NFR" in text and "ΔNFR_c" in text and "only in old: 1" in text
    summary = json.loads((out / "summary.json").read_text())
    # old->compat on a..e: negative flip only on c -> NFR_c = 1/5 (old->new joins a..e too: 2/5)
    assert summary["compat"]["nfr"] == pytest.approx(1 / 6)  # compat shares all 6 ids with old
    assert summary["deltas"]["d_nfr_c"] == pytest.approx(1 / 6 - 2 / 5)
    table = pq.read_table(out / "flips.parquet")
    assert table.num_rows == 5 and "quadrant" in table.column_names
    for png in ("quadrants.png", "quadrants_compat.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lmeval_samples_directly(capsys, tmp_path):
    assert main(["flips", fixture("old", "tiny_mc"), fixture("new", "tiny_mc"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 12 and s["acc_old"] == pytest.approx(7 / 12) and s["acc_new"] == pytest.approx(6 / 12)
    out = tmp_path / "gen"
    assert (
        main(
            [
                "flips",
                fixture("old", "tiny_gen"),
                fixture("new", "tiny_gen"),
                "--metric",
                "rouge1",
                "--json",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    s = json.loads(capsys.readouterr().out)
    assert s["kind"] == "continuous" and s["metric"] == "rouge1" and s["n"] == 8
    assert (out / "d_hist.png").exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "missing.parquet"), "no such file or directory"),
        (lambda d: (d / "x.txt").write_text("hello") and str(d / "x.txt"), "neither a Parquet file nor JSON Lines"),
        (lambda d: write(d / "dup.parquet", ["a", "a"], [1, 0], ["0", "1"]), "duplicate id 'a' at rows 0 and 1"),
        (
            lambda d: write(d / "nan.parquet", ["a", "b"], [1, 0], ["0", "1"], score=[1.0, float("nan")]),
            "column 'score' is nan at row 1",
        ),
        (
            lambda d: (
                pq.write_table(pa.table({"id": ["a"], "task": ["t"], "score": [1.0]}), d / "cols.parquet")
                or str(d / "cols.parquet")
            ),
            "missing column 'correct'",
        ),
    ],
)
def test_bad_input_exit_2_one_line(three, tmp_path, capsys, make, message):
    old = three[0]
    bad = make(tmp_path)
    assert main(["flips", old, bad]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and bad in err and "\n" not in err and "Traceback" not in err


def test_console_script_bad_input(tmp_path, three):
    muscle = Path(sys.executable).parent / "muscle"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "task": "t", "correct": true, "score": NaN, "prediction": "x", "reference": "x"}\n')
    proc = subprocess.run([str(muscle), "flips", three[0], str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "column 'score' is nan at row 0" in lines[0] and str(bad) in lines[0]


def test_task_mismatch_refused_unless_allowed(tmp_path, capsys):
    old = write(tmp_path / "old.parquet", list("ab"), [1, 0], ["0", "1"])
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(old).set_column(1, "task", pa.array(["u", "u"])), other)
    assert main(["flips", old, str(other), "--json"]) == 2
    assert "--allow-task-mismatch" in capsys.readouterr().err
    assert main(["flips", old, str(other), "--json", "--allow-task-mismatch"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    cfg = tmp_path / "flips.yaml"  # the same field from a config file
    cfg.write_text(f"old: {old}\nnew: {other}\nallow_task_mismatch: true\nformat: json\n")
    assert main(["flips", "--config", str(cfg)]) == 0


@pytest.mark.parametrize(
    "out",
    [
        pytest.param(lambda d: "/proc/x", id="under-proc"),
        pytest.param(lambda d: "/proc/self", id="proc-dir"),
        pytest.param(lambda d: (d / "file").write_text("x") and str(d / "file"), id="file-in-the-way"),
        pytest.param(lambda d: (d / "file").write_text("x") and str(d / "file" / "sub"), id="file-as-parent"),
        pytest.param(
            lambda d: (d / "ro").mkdir(mode=0o500) or str(d / "ro" / "report"),
            id="read-only-dir",
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories"),
        ),
    ],
)
def test_unwritable_out_exit_2_one_line(three, tmp_path, capsys, out):
    old, new, _ = three
    where = out(tmp_path)
    assert main(["flips", old, new, "--out", where, "--bootstrap", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"muscle flips: error: --out {where}: cannot write there") and "\n" not in err, err
