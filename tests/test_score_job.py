"""The scoring job end to end through real Ray: bad rows, several versions, determinism, resume,
rows the model cannot take and duplicate ids quarantined, one run per output directory.

Slow (marked): the tests that start a Ray Data actor pool on the tiny models.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from muscle_ray.cli import main
from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.out_lock import out_lock
from muscle_ray.results import read_results
from muscle_ray.scoring.config import ScoreConfig
from muscle_ray.scoring.job import duplicate_ids, run_score
from muscle_ray.tasks import get_task

slow = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BAD_ROWS = {3: "invalid JSON", 7: "label 5 out of range", 11: "no options", 15: "missing field 'context'"}


def write_mc(path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        ctx = "The quick brown fox" + " jumps" * (i % 7) + (" over" if i % 2 else "")
        lines.append(
            json.dumps(
                {
                    "id": f"q{i}",
                    "context": ctx,
                    "label": i % 4,
                    "choices": ["over the lazy dog", "a man", "12 apples" * (1 + i % 3), "sells eggs"],
                }
            )
        )
    for row, reason in BAD_ROWS.items():
        if row < n:
            lines[row] = {
                3: "{not json",
                7: json.dumps({"context": "x", "choices": ["a", "b"], "label": 5}),
                11: json.dumps({"context": "x", "choices": [], "label": 0}),
                15: json.dumps({"choices": ["a", "b"], "label": 0}),
            }[row]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_gen(path: Path, n: int) -> Path:
    rows = [
        {"id": f"g{i}", "prompt": "Question: How many apples" + " x" * i + "? Answer:", "reference": "12"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def table(path) -> dict:
    t = read_results(path).to_pylist()
    return {r["id"]: r for r in t}


def score_mc(model, data: Path, out: Path, **settings) -> dict:
    """One version's mc_jsonl results, id -> row, from a real run with these ScoreConfig settings."""
    run_score(ScoreConfig(versions=[{"base": str(model)}], task="mc_jsonl", data=str(data), out=str(out), **settings))
    return table(out / "model" / "mc_jsonl")


@slow
def test_job_scores_versions_and_logs_bad_rows(tmp_path, ray_session, tiny_model, tiny_model_b, tiny_adapter, capsys):
    data = write_mc(tmp_path / "mc.jsonl", 30)
    cfg = ScoreConfig(
        versions=[
            {"name": "old", "base": str(tiny_model)},
            {"name": "new", "base": str(tiny_model_b)},
            {"name": "compat", "base": str(tiny_model), "adapter": str(tiny_adapter)},
        ],
        task="mc_jsonl",
        data=str(data),
        out=str(tmp_path / "out"),
        shard_size=8,
        batch_size=4,
        workers="1,2",
    )
    summaries = run_score(cfg)
    log = capsys.readouterr().out
    assert [s.version for s in summaries] == ["old", "new", "compat"]
    for s in summaries:
        assert (s.rows, s.errors, s.shards) == (26, 4, 4)
        assert s.rows_per_s > 0 and s.tokens_per_s > 0
        errors = pq.read_table(Path(s.out) / "errors.parquet").to_pylist()
        assert [e["row"] for e in errors] == sorted(BAD_ROWS)
        for e in errors:
            assert BAD_ROWS[e["row"]] in e["reason"], e
    assert "shard 4/4 written" in log and "4 bad rows skipped" in log and "rows/s" in log
    old, new, compat = (table(tmp_path / "out" / v / "mc_jsonl") for v in ("old", "new", "compat"))
    assert set(old) == set(new) == set(compat) and len(old) == 26
    r = old["q0"]
    assert r["prediction"] == str(int(np.argmax(r["choice_logliks"]))) and r["reference"] == "0"
    assert r["pred_norm"] == int(np.argmax(np.array(r["choice_logliks"]) / np.array(r["choice_chars"])))
    assert r["version"] == "old" and r["n_tokens"] > 0 and r["row"] == 0
    assert any(old[k]["choice_logliks"] != compat[k]["choice_logliks"] for k in old)  # the adapter is applied
    assert json.loads((tmp_path / "out" / "summary.json").read_text())[2]["version"] == "compat"

    # --max-errors: the CLI fails (exit 2) past N bad rows
    rc = main(
        [
            "score",
            "--model",
            str(tiny_model),
            "--task",
            "mc_jsonl",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "strict"),
            "--max-errors",
            "2",
            "--shard-size",
            "8",
        ]
    )
    assert rc == 2 and "more than --max-errors 2" in capsys.readouterr().err


@slow
def test_predictions_do_not_depend_on_batch_size_or_workers(tmp_path, ray_session, tiny_model):
    data = write_mc(tmp_path / "mc.jsonl", 24)
    runs = {}
    for bs, workers in [(1, "1"), (8, "2")]:
        runs[bs] = score_mc(tiny_model, data, tmp_path / f"bs{bs}", batch_size=bs, workers=workers, shard_size=5)
    one, eight = runs[1], runs[8]
    assert one.keys() == eight.keys() and len(one) == 20
    for k in one:
        assert one[k]["prediction"] == eight[k]["prediction"] and one[k]["pred_norm"] == eight[k]["pred_norm"]
        np.testing.assert_allclose(one[k]["choice_logliks"], eight[k]["choice_logliks"], atol=1e-4)


@slow
def test_backend_options_reach_the_engine_in_the_actors(tmp_path, ray_session, tiny_model):
    """dtype=bfloat16 loads the model in bf16 inside each actor: log-likelihoods move by bf16's
    rounding (far more than float32's batch noise, 1e-5), not by more."""
    data = write_mc(tmp_path / "mc.jsonl", 12)
    runs = {}
    for name, options in [("fp32", {}), ("bf16", {"dtype": "bfloat16"})]:
        runs[name] = score_mc(tiny_model, data, tmp_path / name, workers="1", backend_options=options)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32.keys() == bf16.keys() and len(fp32) == 9  # rows 3, 7, 11 are bad
    gaps = np.concatenate([np.subtract(fp32[k]["choice_logliks"], bf16[k]["choice_logliks"]) for k in fp32])
    assert 1e-3 < np.abs(gaps).max() < 1.0


@slow
def test_generation_job(tmp_path, ray_session, tiny_model):
    data = write_gen(tmp_path / "gen.jsonl", 6)
    (s,) = run_score(
        ScoreConfig(
            versions=[{"base": str(tiny_model)}],
            task="gen_jsonl",
            data=str(data),
            task_options={"max_new_tokens": 8, "stop": ["?"]},
            out=str(tmp_path / "o"),
            batch_size=4,
            shard_size=4,
        )
    )
    t = table(s.out)
    assert len(t) == 6 and s.tokens_per_s > 0
    assert all(
        r["choice_logliks"] is None and r["reference"] == "12" and "?" not in r["generation"] for r in t.values()
    )
    assert all(r["score"] == float(r["prediction"].strip() == "12") for r in t.values())


@slow
def test_score_command_reads_and_writes_uris(tmp_path, ray_session, tiny_model, capsys, monkeypatch):
    """`muscle score` from a shell with file:// URIs, as under `ray job submit`: the shards land at
    the URI (not in a local folder named `file:`), and a rerun fetches them back and resumes."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    write_gen(bucket / "gen.jsonl", 6)
    monkeypatch.chdir(tmp_path)
    args = [
        "score",
        "--model",
        str(tiny_model),
        "--task",
        "gen_jsonl",
        "--data",
        f"file://{bucket}/gen.jsonl",
        "--task-option",
        "max_new_tokens=4",
        "--out",
        f"file://{bucket}/run",
        "--shard-size",
        "3",
    ]
    assert main(args) == 0
    assert read_results(bucket / "run" / "model" / "gen_jsonl").num_rows == 6
    assert json.loads((bucket / "run" / "summary.json").read_text())[0]["scored"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bucket"]  # nothing written beside it
    assert f"-> file://{bucket}/run" in capsys.readouterr().err
    assert main(args) == 0
    assert "resuming: 2/2 shards already done" in (bucket / "run" / "logs" / "ray.log").read_text()


@slow
def test_killed_run_resumes_to_the_same_table(tmp_path, ray_session, tiny_model):
    import ray

    data = write_mc(tmp_path / "mc.jsonl", 320)
    args = [
        "--model",
        str(tiny_model),
        "--task",
        "mc_jsonl",
        "--data",
        str(data),
        "--shard-size",
        "4",
        "--batch-size",
        "1",
        "--workers",
        "1",
    ]
    cmd = [sys.executable, "-m", "muscle_ray.cli", "score", *args]
    # the drivers join this test's Ray cluster; SIGKILL hits the driver, Ray reaps its actors
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = tmp_path / "killed"
    shards = out / "model" / "mc_jsonl"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while not list(shards.glob("shard-*.parquet")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    n_done = len(list(shards.glob("shard-*.parquet")))
    assert 0 < n_done < 80, f"{n_done} shards done at the kill: not mid-way"
    for f in shards.glob("shard-*.parquet"):  # atomic: every visible shard is whole (a kill mid-write
        pq.read_table(f)  # leaves only a hidden temp file)

    rerun = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    log = (out / "logs" / "ray.log").read_text()  # the console's log: the job's own lines
    assert f"resuming: {n_done}/80 shards already done" in log
    assert f"{out / '.lock'}: taking over the lock of host" in log  # SIGKILL left the file, not the lock
    assert not list(shards.glob(".*.tmp"))  # the rerun cleared any temp file the kill left
    assert main(["score", *args, "--out", str(tmp_path / "whole")]) == 0
    a = read_results(shards).to_pandas().drop(columns=["n_tokens"])
    b = read_results(tmp_path / "whole" / "model" / "mc_jsonl").to_pandas().drop(columns=["n_tokens"])
    assert len(a) == 316
    same = ["id", "prediction", "pred_norm", "correct", "row"]
    assert a[same].equals(b[same])
    np.testing.assert_allclose(
        np.stack(a["choice_logliks"].map(list)), np.stack(b["choice_logliks"].map(list)), atol=1e-5
    )
    assert pq.read_table(shards / "errors.parquet").num_rows == 4


@slow
def test_real_hellaswag_sample(tmp_path, ray_session, shared_data, tiny_model):
    from muscle_ray.tasks import task_names

    if "hellaswag" not in task_names():
        pytest.skip("hellaswag task not registered yet")
    path = shared_data / "hellaswag" / "val_sample1000.jsonl"
    (s,) = run_score(
        ScoreConfig(
            versions=[{"base": str(tiny_model)}],
            task="hellaswag",
            data=str(path),
            out=str(tmp_path / "out"),
            limit=12,
            batch_size=4,
            shard_size=6,
        )
    )
    t = read_results(s.out).to_pylist()
    assert len(t) == 12 and s.errors == 0
    assert all(len(r["choice_logliks"]) == 4 for r in t)


# -- hardening: rows the model cannot take, duplicate ids, one run per OUT ----------------------

LONG = " ".join(["overlong"] * 600)  # far more tokens than the tiny model's context of 512
TOO_LONG = r"option 1's continuation is \d+ tokens, longer than the model's context of 512"


def mc_rows(n: int) -> list[dict]:
    return [
        {"id": f"q{i}", "context": "The quick brown fox", "choices": ["jumps", "sleeps"], "label": i % 2}
        for i in range(n)
    ]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_continuation_longer_than_the_context_is_a_bad_row(tmp_path, tiny_model):
    from muscle_ray.models import ModelVersion
    from muscle_ray.scoring.hf import HFScorer

    rows = mc_rows(2)
    rows[1]["choices"] = ["jumps", LONG]
    task = get_task("mc_jsonl")
    good, bad = (task.parse(r) for r in task.records(str(write_rows(tmp_path / "mc.jsonl", rows))))
    scorer = HFScorer(ModelVersion(str(tiny_model)), batch_size=4)
    with pytest.raises(BadRow, match=TOO_LONG):  # was: IndexError from the logits, the whole batch lost
        scorer.loglikelihoods([good, bad])
    assert len(scorer.loglikelihoods([good])[0].logliks) == 2


def test_duplicate_ids_quarantine_the_second(tmp_path):
    rows = mc_rows(4)
    rows[2]["id"] = "q0"
    rows[3]["id"] = 1  # ids are text: 1 and "1" are the same id
    rows.append({"id": "1", "context": "x", "choices": ["a", "b"], "label": 0})
    task = get_task("mc_jsonl")
    path = write_rows(tmp_path / "mc.jsonl", rows)
    with path.open("a") as f:  # a bad row holds no id: it is quarantined for its own reason
        f.write('{"id": "q1", not json\n')
    assert duplicate_ids(task, list(task.records(str(path)))) == {
        2: "duplicate id 'q0', first seen at row 0",
        4: "duplicate id '1', first seen at row 3",
    }


HOLD = """import sys, time
from muscle_ray.out_lock import out_lock
with out_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_run_per_out_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(MuscleError) as refused:
            with out_lock(out):
                pass
        message = str(refused.value)
        assert message.startswith(f"{out / '.lock'}: another run is writing to this directory (host ")
        assert f"pid {holder.pid}," in message and "\n" not in message
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock, the file stays
        holder.wait()
    assert (out / ".lock").exists()
    seen: list[str] = []
    with out_lock(out, log=seen.append):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert len(seen) == 1 and "taking over the lock of host" in seen[0] and f"pid {holder.pid}," in seen[0]
    assert not (out / ".lock").exists()  # released on exit
    with out_lock(out, log=seen.append):
        pass
    assert len(seen) == 1  # a clean release leaves nothing to take over


def test_score_command_refuses_a_held_out(tmp_path, tiny_model, capsys):
    data = write_rows(tmp_path / "mc.jsonl", mc_rows(2))
    out = tmp_path / "out"
    with out_lock(out):
        rc = main(["score", "--model", str(tiny_model), "--task", "mc_jsonl", "--data", str(data), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"muscle score: error: {out / '.lock'}: another run is writing")
    assert f"pid {os.getpid()}," in err[0]
    assert not list(out.glob("model/**/*.parquet"))  # refused before anything was scored


@slow
def test_bad_rows_of_a_batch_and_duplicate_ids_are_quarantined(tmp_path, ray_session, tiny_model, capsys):
    rows = mc_rows(10)
    rows[2]["choices"] = ["jumps", LONG]  # the model cannot take it; rows 0-9 share one Ray Data batch
    rows[6]["id"] = "q1"  # a duplicate of row 1, in another shard
    data = write_rows(tmp_path / "mc.jsonl", rows)
    (s,) = run_score(
        ScoreConfig(
            versions=[{"base": str(tiny_model)}],
            task="mc_jsonl",
            data=str(data),
            out=str(tmp_path / "out"),
            shard_size=4,
            batch_size=4,
        )
    )
    errors = {e["row"]: e for e in pq.read_table(Path(s.out) / "errors.parquet").to_pylist()}
    assert sorted(errors) == [2, 6] and (s.rows, s.errors) == (8, 2)
    assert re.fullmatch(TOO_LONG, errors[2]["reason"]) and "overlong" in errors[2]["raw"]
    assert errors[6]["reason"] == "duplicate id 'q1', first seen at row 1"
    scored = read_results(s.out).to_pylist()
    assert sorted(r["row"] for r in scored) == [0, 1, 3, 4, 5, 7, 8, 9]  # the rest of the batch is kept
    assert main(["flips", s.out, s.out, "--json", "--bootstrap", "10"]) == 0  # ids unique: flips reads it
    assert not (tmp_path / "out" / ".lock").exists()

    # a model or input that fails every row is not a run with bad rows: it stops, naming the first reason
    with pytest.raises(MuscleError, match=r"none of the 2 rows could be scored \(the first: option 1's"):
        run_score(
            ScoreConfig(
                versions=[{"base": str(tiny_model)}],
                task="mc_jsonl",
                data=str(write_rows(tmp_path / "long.jsonl", [rows[2], {**rows[2], "id": "x"}])),
                out=str(tmp_path / "all_bad"),
            )
        )
