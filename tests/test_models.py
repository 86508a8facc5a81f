"""Naming a model: local directories, hub ids from the local cache, GGUF files; and the tokenizer check.

Fast: a hand-built Hugging Face cache holding the tiny zoo model, no network (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from muscle_ray.errors import MuscleError
from muscle_ray.model_sources import config_model, convert_gguf, resolve_model
from muscle_ray.models import ModelVersion, check_same_tokenizer

SHA = "0123456789abcdef0123456789abcdef01234567"
TAG_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model) -> Path:
    """`tiny-org/tiny-llama` in the hub cache layout: main at SHA, tag v2 at TAG_SHA."""
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-llama"
    for sha in (SHA, TAG_SHA):
        shutil.copytree(tiny_model, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    (repo / "refs" / "v2").write_text(TAG_SHA)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MUSCLE_WORKSPACE", raising=False)
    return repo


def test_hub_ids_resolve_from_the_local_cache(hub_cache):
    assert resolve_model("tiny-org/tiny-llama") == hub_cache / "snapshots" / SHA
    assert resolve_model("tiny-org/tiny-llama@v2") == hub_cache / "snapshots" / TAG_SHA
    assert resolve_model(f"tiny-org/tiny-llama@{TAG_SHA}") == hub_cache / "snapshots" / TAG_SHA
    v = ModelVersion("tiny-org/tiny-llama@v2", name="new")
    assert v.base == str(hub_cache / "snapshots" / TAG_SHA)


def test_a_hub_id_not_in_the_cache_is_one_line_naming_it(hub_cache):
    with pytest.raises(
        MuscleError,
        match=r"^tiny-org/other: no such local directory, and not in the local "
        r"Hugging Face cache",
    ) as e:
        ModelVersion("tiny-org/other")
    assert "\n" not in str(e.value)
    with pytest.raises(MuscleError, match=r"^tiny-org/tiny-llama@v3: no such local directory, and not in"):
        resolve_model("tiny-org/tiny-llama@v3")


def test_a_local_directory_wins_over_a_hub_id_of_the_same_name(hub_cache, tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "tiny-org" / "tiny-llama")
    assert resolve_model("tiny-org/tiny-llama") == Path("tiny-org/tiny-llama")
    # ... also when it is under the workspace a submitted job reads its relative paths from
    monkeypatch.chdir(hub_cache)
    monkeypatch.setenv("MUSCLE_WORKSPACE", str(tmp_path))
    assert resolve_model("tiny-org/tiny-llama") == Path("tiny-org/tiny-llama")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config_model("~/tiny-org/tiny-llama") == str(tmp_path / "tiny-org" / "tiny-llama")


def test_configs_resolve_hub_ids_when_read_and_name_the_field(hub_cache):
    from muscle_ray.config import validated
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.serving.config import ServeAppConfig
    from muscle_ray.training.config import CompatTrainConfig

    snapshot = str(hub_cache / "snapshots" / SHA)
    score = ScoreConfig(
        versions=[{"name": "old", "base": "tiny-org/tiny-llama"}, {"name": "new", "base": "runs/zoo/v2"}],
        task="mc_jsonl",
        out="o",
    )
    assert [v.base for v in score.versions] == [snapshot, "runs/zoo/v2"]  # local paths stay as written
    train = CompatTrainConfig(
        base="tiny-org/tiny-llama@v2",
        out="o",
        data={"path": "d.jsonl"},
        compat={"old": {"base": "tiny-org/tiny-llama"}, "new_adapter": "a"},
    )
    assert (train.base, train.compat.old.base) == (str(hub_cache / "snapshots" / TAG_SHA), snapshot)
    serve = ServeAppConfig(bases={"v1": {"path": "tiny-org/tiny-llama", "models": {"old": None, "new": None}}})
    assert serve.bases["v1"].path == snapshot
    # perhaps a directory under the workspace or the app's root: ModelVersion checks it where it is opened
    missing = ScoreConfig(versions=[{"base": "tiny-org/missing"}], task="mc_jsonl", out="o")
    assert missing.versions[0].base == "tiny-org/missing"
    with pytest.raises(MuscleError, match=r"^tiny-org/missing: no such local directory, and not in the local"):
        missing.versions[0].model_version()
    with pytest.raises(MuscleError, match=r"field 'compat.old.base': .*missing.gguf: no such GGUF file"):
        validated(
            CompatTrainConfig,
            {
                "base": "m",
                "out": "o",
                "data": {"path": "d"},
                "compat": {"old": {"base": "/nowhere/missing.gguf"}, "new_adapter": "a"},
            },
            "cfg.yaml",
        )


def test_gguf_paths_are_checked(tmp_path):
    with pytest.raises(MuscleError, match="missing.gguf: no such GGUF file"):
        ModelVersion(str(tmp_path / "missing.gguf"))


def test_conversion_is_all_or_nothing(tmp_path, monkeypatch, tiny_model):
    """A conversion that fails leaves nothing; one that loses the race to another process
    returns the winner's directory and removes its own."""
    import muscle_ray.model_sources as sources

    monkeypatch.setenv("MUSCLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MUSCLE_WORKSPACE", raising=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)

    def crash(path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(sources, "write_hf_dir", crash)
    with pytest.raises(RuntimeError):
        convert_gguf(gguf)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []

    def lose_the_race(path, out):
        shutil.copytree(tiny_model, out, dirs_exist_ok=True)
        shutil.copytree(tiny_model, out.parent / sources.gguf_key(path))  # the other process renames first

    monkeypatch.setattr(sources, "write_hf_dir", lose_the_race)
    dest = convert_gguf(gguf)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [dest.name]
    assert ModelVersion(str(gguf)).base == str(dest)  # converted once: found in the cache now


def _with_tokenizer(src: Path, dest: Path, change) -> Path:
    """A copy of a model directory whose tokenizer `change` edited."""
    shutil.copytree(src, dest)
    tok = AutoTokenizer.from_pretrained(src)
    change(tok)
    tok.save_pretrained(dest)
    return dest


def test_added_and_renamed_special_tokens_warn_with_a_count(tmp_path, tiny_model, tiny_model_b, caplog):
    def add_end_token(tok):
        tok.add_tokens(["<|end|>"], special_tokens=True)
        tok.eos_token = "<|end|>"

    chat = _with_tokenizer(tiny_model, tmp_path / "chat", add_end_token)
    with caplog.at_level(logging.WARNING):
        check_same_tokenizer([ModelVersion(str(tiny_model), name="old"), ModelVersion(str(tiny_model_b), name="new")])
    assert caplog.records == []
    with caplog.at_level(logging.WARNING):
        check_same_tokenizer([ModelVersion(str(tiny_model), name="old"), ModelVersion(str(chat), name="new")])
    (record,) = caplog.records
    assert "old and new: 1 token(s) in one vocabulary only (e.g. '<|end|>'" in record.getMessage()
    assert "eos_token" in record.getMessage() and "-> '<|end|>'" in record.getMessage()


def test_shared_tokens_with_other_ids_are_refused_naming_both_models(tmp_path, tiny_model):
    swapped = shutil.copytree(tiny_model, tmp_path / "swapped")
    state = json.loads((swapped / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.__getitem__)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same strings, two of them under each other's id
    (swapped / "tokenizer.json").write_text(json.dumps(state))
    shared = len(AutoTokenizer.from_pretrained(tiny_model).get_vocab())
    with pytest.raises(
        MuscleError,
        match=(
            rf"do not share a tokenizer: old \({tiny_model}\) and new \({swapped}\) "
            rf"map 2 of {shared} shared tokens to different ids, e.g. {a!r}"
        ),
    ):
        check_same_tokenizer([ModelVersion(str(tiny_model), name="old"), ModelVersion(str(swapped), name="new")])
