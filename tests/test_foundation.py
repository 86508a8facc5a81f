"""The shared pieces every job stands on: results contract, model loading, tiny models."""

import math

import pyarrow as pa
import pytest

from muscle_ray import results
from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion, check_same_tokenizer, load_model, load_tokenizer


def _table(**over):
    cols = dict(
        id=["a", "b"],
        task=["t", "t"],
        correct=[True, False],
        score=[1.0, 0.0],
        prediction=["0", "1"],
        reference=["0", "0"],
    )
    cols.update(over)
    return pa.table(cols)


def test_results_roundtrip_and_dir_of_shards(tmp_path):
    results.write_atomic(_table(), tmp_path / "r" / "part-0.parquet")
    results.write_atomic(_table(id=["c", "d"]), tmp_path / "r" / "part-1.parquet")
    t = results.read_results(tmp_path / "r")
    assert sorted(t.column("id").to_pylist()) == ["a", "b", "c", "d"]
    assert t.schema.field("score").type == pa.float64()
    assert not list((tmp_path / "r").glob(".*tmp"))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(id=["a", "a"]), "duplicate id 'a' at rows 0 and 1"),
        (dict(score=[1.0, math.nan]), "column 'score' is nan at row 1"),
    ],
)
def test_results_validation_names_file_column_row(tmp_path, bad, message):
    path = results.write_atomic(_table(**bad), tmp_path / "x.parquet")
    with pytest.raises(MuscleError, match=message) as e:
        results.read_results(path)
    assert str(path) in str(e.value)


def test_results_missing_column(tmp_path):
    path = results.write_atomic(_table().drop(["reference"]), tmp_path / "x.parquet")
    with pytest.raises(MuscleError, match="missing column 'reference'"):
        results.read_results(path)


def test_model_version_loads_base_and_adapter(tiny_model, tiny_adapter):
    import torch

    base = load_model(ModelVersion(str(tiny_model)), device="cpu")
    tuned = load_model(ModelVersion(str(tiny_model), str(tiny_adapter)), device="cpu")
    tok = load_tokenizer(ModelVersion(str(tiny_model)))
    ids = tok("A man is sitting on a roof.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = base(ids).logits, tuned(ids).logits
    assert a.dtype == torch.float32 and a.shape == b.shape
    assert not torch.allclose(a, b), "a random LoRA adapter must change the logits"


def test_model_version_rejects_non_model_dirs(tmp_path):
    with pytest.raises(MuscleError, match="no config.json"):
        ModelVersion(str(tmp_path))


def test_tokenizer_mismatch_is_named(tmp_path, tiny_model, tiny_model_b):
    from muscle_ray.zoo.llama import random_model_dir
    from muscle_ray.zoo.tokenizer import build_tokenizer

    check_same_tokenizer([ModelVersion(str(tiny_model), name="old"), ModelVersion(str(tiny_model_b), name="new")])
    other = random_model_dir(tmp_path / "other", tokenizer=build_tokenizer(["completely different text"] * 5, 300))
    with pytest.raises(MuscleError, match="do not share a tokenizer"):
        check_same_tokenizer([ModelVersion(str(tiny_model), name="old"), ModelVersion(str(other), name="new")])
