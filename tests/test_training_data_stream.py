"""Streamed training data (`DataConfig.stream`): the same rows, in the same order, as the
in-memory path; bad rows named by file and row; `auto` streams only big files."""

import json

import numpy as np
import pytest

from muscle_ray.errors import MuscleError
from muscle_ray.training import data as data_mod
from muscle_ray.training.config import DataConfig
from muscle_ray.training.data import build_datasets

COLUMNS = ("input_ids", "attention_mask", "labels")
slow = pytest.mark.slow  # start Ray (its start and the first worker's imports take ~20 s here)


def _rows(ds) -> list[dict]:
    ds.context.execution_options.preserve_order = True  # as Ray Train reads a streamed dataset (job._ingest)
    return ds.take_all()


def _same(a, b) -> None:
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb)
    for i, (x, y) in enumerate(zip(ra, rb)):
        for k in COLUMNS:
            assert np.asarray(x[k]).dtype == np.asarray(y[k]).dtype == np.int64, k
            assert np.array_equal(x[k], y[k]), f"row {i}, {k}"


def _both(data: DataConfig, base) -> None:
    """Build both ways and compare: train, val and their sizes."""
    mem = build_datasets(data.model_copy(update={"stream": "off"}), str(base))
    streamed = build_datasets(data.model_copy(update={"stream": "on"}), str(base))
    assert not mem.streamed and streamed.streamed
    assert (mem.n_train, mem.n_val) == (streamed.n_train, streamed.n_val)
    _same(mem.train, streamed.train)
    _same(mem.val, streamed.val)


def _pairs(n: int) -> list[dict]:
    """Prompt/completion rows of varied length; some are cut at max_length, some prompts end in a space."""
    return [
        {"prompt": f"q{i}: " + "how many figs " * (i % 7) + ("? " if i % 3 else "?"), "completion": f" {i * 3} figs."}
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 4 rows, so the held-out tail starts inside a chunk and reads span several."""
    monkeypatch.setattr(data_mod, "CHUNK_ROWS", 4)


@slow
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_streamed_rows_are_the_in_memory_rows(tmp_path, tiny_model, ray_session, kind):
    rows = _pairs(23)
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        lines = [json.dumps(r) for r in rows]
        lines.insert(5, "")  # blank lines are skipped alike
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    # 23 rows, 0.2 held out: 18 train, 5 val; max_length cuts the long ones
    _both(DataConfig(path=str(path), max_length=24, val_fraction=0.2, loss_on="completion"), tiny_model)


@slow
def test_streamed_val_path_and_chat_messages(tmp_path, tiny_chat_model, ray_session):
    convo = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(9)
    ]
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in convo + _pairs(4)))
    val.write_text("".join(json.dumps(r) + "\n" for r in convo[:5]))
    _both(DataConfig(path=str(train), val_path=str(val), chat_template=True, max_length=96), tiny_chat_model)


@slow
def test_streamed_task_file_and_too_small_to_hold_out(tmp_path, tiny_model, ray_session):
    path = tmp_path / "mc.jsonl"
    rows = [{"context": f"{i} + 1 =", "choices": [str(i), str(i + 1), "x"], "label": 1} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _both(DataConfig(path=str(path), task="mc_jsonl", max_length=32), tiny_model)  # 6 x 0.1 rounds to 0: val = train
    _both(DataConfig(path=str(path), task="mc_jsonl", max_length=32, val_fraction=0.5), tiny_model)


@slow
def test_a_bad_row_in_a_streamed_file_is_named_by_file_and_row(tmp_path, tiny_model, ray_session):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in _pairs(11)]
    lines[9] = json.dumps({"prompt": "no answer"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MuscleError) as e:
        build_datasets(DataConfig(path=str(path), stream="on"), str(tiny_model))
    assert str(e.value) == f"{path}: row 10: field 'completion' missing or not a string (or give 'messages')"
    task_file = tmp_path / "mc.jsonl"
    task_file.write_text(json.dumps({"context": "a", "choices": ["b"], "label": 0}) + "\n" + '{"context": "a"}\n')
    with pytest.raises(MuscleError, match=r"mc.jsonl: row 1: missing field 'choices' \(task mc_jsonl\)$"):
        build_datasets(DataConfig(path=str(task_file), task="mc_jsonl", stream="on"), str(tiny_model))


@slow
def test_auto_builds_a_small_file_in_memory_and_streams_a_big_one(tmp_path, tiny_model, ray_session, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(20)))
    auto = DataConfig(path=str(path))
    write = data_mod._write_remote
    calls = []

    def counted(*args):
        calls.append(args[0])
        return write(*args)

    monkeypatch.setattr(data_mod, "_write_remote", counted)
    built = build_datasets(auto, str(tiny_model))
    assert not built.streamed and not calls and (built.n_train, built.n_val) == (18, 2)
    monkeypatch.setattr(data_mod, "STREAM_THRESHOLD", path.stat().st_size - 1)
    built = build_datasets(auto, str(tiny_model))
    assert built.streamed and calls == [str(path)] and (built.n_train, built.n_val) == (18, 2)
    assert len(_rows(built.train)) == 18


def test_auto_streams_only_files_over_the_threshold(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(20)))
    auto = DataConfig(path=str(path))
    assert auto.stream == "auto" and not data_mod.streams(auto)
    monkeypatch.setattr(data_mod, "STREAM_THRESHOLD", path.stat().st_size - 1)
    assert data_mod.streams(auto)
    assert not data_mod.streams(auto.model_copy(update={"stream": "off"}))
    assert data_mod.streams(DataConfig(path=str(path), stream="on"))
    assert not data_mod.streams(DataConfig(path=str(tmp_path / "missing.jsonl")))  # refused by the reader


def test_stream_setting_is_validated_and_takes_yaml_on_off():
    assert DataConfig.model_validate({"path": "x", "stream": True}).stream == "on"  # YAML's bare `on`
    assert DataConfig.model_validate({"path": "x", "stream": False}).stream == "off"
    with pytest.raises(ValueError, match="stream"):
        DataConfig.model_validate({"path": "x", "stream": "sometimes"})


def test_pad_rows_is_tokenize_pair_row_for_row(tiny_model):
    """The streamed rows are padded in one go from unpadded ids; `tokenize_pair` pads one row."""
    from muscle_ray.models import ModelVersion, load_tokenizer
    from muscle_ray.training.data import pad_rows, pair_ids, tokenize_pair

    tok = load_tokenizer(ModelVersion(str(tiny_model)))
    pairs = [(p["prompt"], p["completion"]) for p in _pairs(9)]
    for loss_on in ("all", "completion"):
        got = [pair_ids(tok, p, c, 12, loss_on) for p, c in pairs]
        padded = pad_rows(
            np.array([len(ids) for ids, _ in got]),
            np.array([t for ids, _ in got for t in ids], dtype=np.int32),
            np.array([nl for _, nl in got]),
            12,
            tok.pad_token_id,
        )
        for i, (p, c) in enumerate(pairs):
            want = tokenize_pair(tok, p, c, 12, loss_on)
            for k in COLUMNS:
                assert np.array_equal(padded[k][i], want[k]), (loss_on, i, k)


@slow
def test_the_chunk_read_is_not_fused_into_the_teacher_cache_actors(tmp_path, tiny_model, ray_session, capsys):
    """The read is pinned to the driver's node; fused with the teacher cache's actor pool
    (`teachers.build_teacher_cache`), it would take the teachers there with it."""

    class Echo:  # defined here: a class of a test module is shipped to the actors by value
        def __call__(self, batch):
            return batch

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(10)))
    built = build_datasets(DataConfig(path=str(path), stream="on"), str(tiny_model))
    ds = built.train.map_batches(Echo, concurrency=1, num_cpus=0.25, batch_format="numpy")
    capsys.readouterr()
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(_read_chunk)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(Echo)]" in optimized
    assert len(_rows(ds)) == 9


@slow
def test_training_on_streamed_data_gives_the_same_adapter(tmp_path, tiny_model, ray_session):
    """Same rows, same order (Ray Train keeps the streamed file order): the same weights; the
    chunks' scratch directory is gone after the run."""
    from safetensors.torch import load_file

    from muscle_ray.config import validated
    from muscle_ray.training.config import AdapterTrainConfig
    from muscle_ray.training.job import run_training

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(30)))
    out = {}
    for stream in ("off", "on"):
        raw = {
            "base": str(tiny_model),
            "out": str(tmp_path / stream),
            "data": {"path": str(path), "max_length": 32, "stream": stream},
            "lora": {"r": 4, "alpha": 8},
            "optim": {"micro_batch_size": 4, "max_steps": 4, "lr": 1e-2},
            "run": {"name": stream, "storage_path": str(tmp_path / "ray"), "cpus_per_worker": 0.25},
        }
        manifest = run_training(validated(AdapterTrainConfig, raw))
        out[stream] = (
            manifest["best_metrics"]["val_loss"],
            load_file(str(tmp_path / stream / "adapter_model.safetensors")),
        )
    assert out["on"][0] == out["off"][0]
    assert all(np.array_equal(out["on"][1][k].numpy(), out["off"][1][k].numpy()) for k in out["off"][1])
    assert not list((tmp_path / "ray").glob(".*.data-*"))
