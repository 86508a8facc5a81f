"""The scoring job's input shards (`scoring.inputs`): the driver holds no records.

Fast: input shards written from the task's records, duplicate ids found through hashes and
checked by their real ids, reuse on resume, rewrite when the file changes. Slow (marked): a run
through real Ray scores from the input shards, quarantines a bad row and a duplicate id, and a
rerun reuses the shards.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from muscle_ray.errors import MuscleError
from muscle_ray.scoring.inputs import (
    MANIFEST,
    IdHashes,
    duplicate_ids,
    first_seen,
    input_dir,
    input_shard,
    prepare_inputs,
)
from muscle_ray.tasks import get_task

slow = pytest.mark.slow


def mc_rows(n: int) -> list[dict]:
    return [
        {"id": f"q{i}", "context": f"The fox {i}", "choices": ["jumps", "sleeps"], "label": i % 2} for i in range(n)
    ]


def write_rows(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prepare(data: Path, out: Path, limit: int | None = None, shard_size: int = 4, log=lambda *_: None):
    return prepare_inputs("mc_jsonl", {}, str(data), out, limit, shard_size, log=log, remote=False)


def test_input_shards_hold_the_records_in_order_with_duplicates_marked(tmp_path):
    rows: list[dict | str] = list(mc_rows(10))
    rows[6] = {**mc_rows(2)[1], "context": "other"}  # id q1 again, in the second shard
    rows[8] = "{not json"  # a bad row has no id: the actor quarantines it for its own reason
    data = write_rows(tmp_path / "mc.jsonl", rows)
    inputs = prepare(data, tmp_path / "out")
    assert (inputs.records, inputs.n_shards, inputs.reused) == (10, 3, False)
    assert inputs.duplicates == {6: "duplicate id 'q1', first seen at row 1"}
    assert inputs.dir == tmp_path / "out" / "_input" / "mc_jsonl"

    task = get_task("mc_jsonl")
    expected = list(task.records(str(data)))
    seen = []
    for k in range(3):
        t = pq.read_table(input_shard(inputs.dir, k))
        assert t.column_names == ["ord", "row", "record", "error"]
        assert t.column("ord").to_pylist() == list(range(4 * k, min(4 * k + 4, 10)))
        seen += [pickle.loads(b) for b in t.column("record").to_pylist()]
        assert t.column("row").to_pylist() == [r.row for r in seen[4 * k :]]
        errors = t.column("error").to_pylist()
        assert errors == [inputs.duplicates.get(i, "") for i in t.column("ord").to_pylist()]
    assert seen == expected
    assert {f.name for f in inputs.dir.iterdir()} == {MANIFEST, *(f"_input-0000{k}.parquet" for k in range(3))}


def test_limit_is_respected(tmp_path):
    data = write_rows(tmp_path / "mc.jsonl", mc_rows(10))
    inputs = prepare(data, tmp_path / "out", limit=5)
    assert (inputs.records, inputs.n_shards) == (5, 2)
    assert pq.read_metadata(input_shard(inputs.dir, 1)).num_rows == 1


def test_duplicates_are_checked_by_their_real_ids_not_their_hashes(tmp_path):
    task = get_task("mc_jsonl")
    rows: list[dict | str] = list(mc_rows(4))
    rows.append({**mc_rows(3)[2], "context": "again"})  # row 4: a true duplicate of q2
    records = list(task.records(str(write_rows(tmp_path / "mc.jsonl", rows))))
    every_one_collides = IdHashes(hash_fn=lambda s: 7)
    for k, rec in enumerate(records):
        every_one_collides.add(k, task.parse(rec).id)
    assert every_one_collides.candidates() == [0, 1, 2, 3, 4]  # all share a hash: all are checked
    assert first_seen(task, ((k, records[k]) for k in every_one_collides.candidates())) == {
        4: "duplicate id 'q2', first seen at row 2"
    }
    real = IdHashes()
    for k, rec in enumerate(records):
        real.add(k, task.parse(rec).id)
    assert real.candidates() == [2, 4]  # the real hash narrows the check to the true pair
    assert duplicate_ids(task, records) == {4: "duplicate id 'q2', first seen at row 2"}


def test_a_rerun_reuses_matching_input_shards(tmp_path):
    data = write_rows(tmp_path / "mc.jsonl", mc_rows(10))
    first = prepare(data, tmp_path / "out")
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in first.dir.glob("_input-*.parquet")}
    log: list[str] = []
    again = prepare(data, tmp_path / "out", log=log.append)
    assert again.reused and (again.records, again.duplicates) == (first.records, first.duplicates)
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in again.dir.glob("_input-*.parquet")} == stamps
    assert len(log) == 1 and "reusing the input shards" in log[0]

    # a missing shard, or other settings, and they are written again
    input_shard(first.dir, 1).unlink()
    assert not prepare(data, tmp_path / "out").reused
    assert not prepare(data, tmp_path / "out", shard_size=5).reused


def test_a_changed_file_or_limit_rewrites_the_input_shards(tmp_path):
    data = write_rows(tmp_path / "mc.jsonl", mc_rows(10))
    prepare(data, tmp_path / "out")
    rows: list[dict | str] = list(mc_rows(10))
    rows[9] = {**rows[9], "id": "q0"}
    write_rows(data, rows)
    os.utime(data, ns=(0, 12345))  # whatever the clock's resolution, the mtime changed
    changed = prepare(data, tmp_path / "out")
    assert not changed.reused and changed.duplicates == {9: "duplicate id 'q0', first seen at row 0"}

    fewer = prepare(data, tmp_path / "out", limit=3)
    assert not fewer.reused and fewer.records == 3 and fewer.duplicates == {}
    assert sorted(f.name for f in fewer.dir.glob("_input-*")) == ["_input-00000.parquet"]  # stale ones gone
    assert json.loads((fewer.dir / MANIFEST).read_text())["fingerprint"]["limit"] == 3


def test_a_missing_file_is_named_and_task_names_make_folder_names(tmp_path):
    with pytest.raises(MuscleError, match=r"nope\.jsonl: no such file \(input of task mc_jsonl\)"):
        prepare(tmp_path / "nope.jsonl", tmp_path / "out")
    assert input_dir(tmp_path, "lmeval:arc_easy") == tmp_path / "_input" / "lmeval-arc_easy"


@slow
def test_job_scores_from_input_shards_and_a_rerun_reuses_them(tmp_path, ray_session, tiny_model):
    from muscle_ray.results import parquet_files, read_results
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score

    rows: list[dict | str] = list(mc_rows(11))
    rows[3] = '{"id": "q3", not json'
    rows[9] = {**rows[9], "id": "q2"}  # a duplicate of row 2, in the last shard
    data = write_rows(tmp_path / "mc.jsonl", rows)
    cfg = ScoreConfig(
        versions=[{"base": str(tiny_model)}],
        task="mc_jsonl",
        data=str(data),
        out=str(tmp_path / "out"),
        shard_size=4,
        batch_size=2,
        workers=2,
    )
    progress: list[int] = []
    (s,) = run_score(cfg, log=lambda *_: None, progress=progress.append)
    assert (s.rows, s.errors, s.shards, s.scored) == (9, 2, 3, 9) and sum(progress) == 11
    errors = {e["row"]: e for e in pq.read_table(Path(s.out) / "errors.parquet").to_pylist()}
    assert sorted(errors) == [3, 9]
    assert "invalid JSON" in errors[3]["reason"] and errors[3]["raw"] == '{"id": "q3", not json'
    assert errors[9]["reason"] == "duplicate id 'q2', first seen at row 2"
    assert json.loads(errors[9]["raw"])["id"] == "q2"
    scored = read_results(s.out).to_pylist()
    assert sorted(r["row"] for r in scored) == [0, 1, 2, 4, 5, 6, 7, 8, 10]
    for k in range(3):
        assert [r["row"] for r in pq.read_table(Path(s.out) / f"shard-0000{k}.parquet").to_pylist()] == [
            r for r in range(4 * k, min(4 * k + 4, 11)) if r not in (3, 9)
        ]
    assert json.loads((Path(s.out) / "_run.json").read_text())["records"] == 11
    assert all("_input" not in f.parts for f in parquet_files(tmp_path / "out"))  # not results to readers
    inputs = tmp_path / "out" / "_input" / "mc_jsonl"
    assert sorted(f.name for f in inputs.glob("_input-*")) == [f"_input-0000{k}.parquet" for k in range(3)]

    # a rerun reuses the input shards and scores only the result shard that is missing
    (Path(s.out) / "shard-00001.parquet").unlink()
    stamps = {f: f.stat().st_mtime_ns for f in inputs.glob("_input-*")}
    log: list[str] = []
    (again,) = run_score(cfg, log=log.append)
    assert (again.rows, again.errors, again.scored, again.resumed_shards) == (9, 2, 4, 2)
    assert any("reusing the input shards" in line for line in log)
    assert {f: f.stat().st_mtime_ns for f in inputs.glob("_input-*")} == stamps


@slow
def test_the_input_read_is_not_fused_into_the_scoring_actors(tmp_path, ray_session, capsys):
    """The read is pinned to the driver's node; fused, it would take the actors there with it."""
    import ray.data

    from muscle_ray.scoring.job import _pieces, _read_inputs

    class Echo:  # defined here: a class of a test module is shipped to the actors by value
        def __call__(self, batch):
            return batch

    inputs = prepare(write_rows(tmp_path / "mc.jsonl", mc_rows(6)), tmp_path / "out")
    for cpus in (0.25, 1):  # whatever the actors ask, the same or not
        ds = _read_inputs(_pieces(inputs, list(range(inputs.n_shards)), 2, 2)).map_batches(
            Echo, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus
        )
        capsys.readouterr()
        ds.explain()
        optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
        assert "TaskPoolMapOperator[MapBatches(_read_input)]" in optimized
        assert "ActorPoolMapOperator[MapBatches(Echo)]" in optimized
    assert sorted(ds.take_all(), key=lambda r: r["ord"])[5]["row"] == 5


def test_pieces_cut_few_shards_for_every_actor_and_leave_many_whole(tmp_path):
    from muscle_ray.scoring.inputs import Inputs
    from muscle_ray.scoring.job import _pieces

    one = _pieces(Inputs(tmp_path, 200, 256, {}), [0], rows=32, actors=2)  # 200 rows, one shard
    assert len(one) == 6  # 4 per actor wanted, but no piece under 32 rows
    assert [p["start"] for p in one][0] == 0 and one[-1]["stop"] == 200
    assert all(a["stop"] == b["start"] for a, b in zip(one, one[1:]))
    assert min(p["stop"] - p["start"] for p in one) >= 32
    many = _pieces(Inputs(tmp_path, 100 * 256 - 7, 256, {}), list(range(100)), rows=32, actors=2)
    assert len(many) == 100 and many[-1] == {"file": str(tmp_path / "_input-00099.parquet"), "start": 0, "stop": 249}
    tiny = _pieces(Inputs(tmp_path, 5, 256, {}), [0], rows=32, actors=8)
    assert [(p["start"], p["stop"]) for p in tiny] == [(0, 5)]
