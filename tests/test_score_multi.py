"""Several model versions scored in one pass: one actor holds a base and all its adapters.

Fast: the multi-adapter model against each adapter loaded alone, the grouping, broken adapters
named on the driver. Slow (marked): the job through real Ray against per-version scoring,
resume of one version's shard, an adapter that fails in the actor.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion
from muscle_ray.results import read_results
from muscle_ray.scoring.backend import VersionGroup, group_versions, score_instances
from muscle_ray.scoring.config import ScoreConfig
from muscle_ray.scoring.hf import HFScorer
from muscle_ray.scoring.job import run_score
from muscle_ray.tasks import get_task
from muscle_ray.tasks.base import Instance

slow = pytest.mark.slow

MC = [
    Instance(
        id=f"q{i}",
        task="t",
        kind="mc",
        contexts=[ctx],
        continuations=conts,
        choice_chars=[len(c) for c in conts],
        label=0,
        reference="0",
    )
    for i, (ctx, conts) in enumerate(
        [
            ("The quick brown fox jumps", [" over the lazy dog.", " a man", " 12 apples"]),
            ("Question: How many apples are left? Answer:", [" 12", " 9 apples", " #### 18"]),
            ("", ["The dog", "A cat sat", "0 1 2"]),
        ]
    )
]
GEN = [
    Instance(id="g0", task="t", kind="gen", contexts=["The quick brown fox"], stop=["\n"], max_new_tokens=8),
    Instance(id="g1", task="t", kind="gen", contexts=["She sells"], stop=["."], max_new_tokens=6),
]


@pytest.fixture(scope="module")
def adapter_qv(tmp_path_factory, tiny_model) -> Path:
    """A second LoRA adapter for tiny_model, on fewer modules and another rank than tiny_adapter
    (so one PeftModel holds adapters that cover different layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    cfg = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora_qv") / "adapter"
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def mismatched_adapter(adapter: Path, dest: Path) -> Path:
    """A copy of `adapter` whose config says another rank than its weights have: its files read
    fine, and loading it on the base fails (a size mismatch)."""
    out = Path(shutil.copytree(adapter, dest))
    config = out / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))
    return out


# -- the multi-adapter model -----------------------------------------------------------------


def test_one_model_with_all_adapters_scores_like_each_loaded_alone(tiny_model, tiny_adapter, adapter_qv):
    versions = [
        ModelVersion(str(tiny_model), adapter=str(tiny_adapter), name="a"),
        ModelVersion(str(tiny_model), name="base"),
        ModelVersion(str(tiny_model), adapter=str(adapter_qv), name="qv"),
    ]
    group = VersionGroup("hf", versions, batch_size=2)
    alone = {v.name: HFScorer(v, batch_size=3) for v in versions}  # base (+ adapter) by load_model
    seen = {}
    for name in ["a", "base", "qv", "a", "qv", "base"]:  # switching back and forth changes nothing
        with group.using(name) as scorer:
            lls = [o.logliks for o in scorer.loglikelihoods(MC)]
            texts = [o.text for o in scorer.generate(GEN)]
        ref = alone[name]
        for a, b in zip(lls, [o.logliks for o in ref.loglikelihoods(MC)]):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
        assert texts == [o.text for o in ref.generate(GEN)], name
        if name in seen:
            np.testing.assert_array_equal(lls, seen[name])
        seen[name] = lls
    assert not np.allclose(seen["a"], seen["base"], atol=1e-3)  # the adapters do change the scores
    assert not np.allclose(seen["qv"], seen["base"], atol=1e-3)
    assert not np.allclose(seen["a"], seen["qv"], atol=1e-3)


def test_an_adapter_that_does_not_load_is_named(tmp_path, tiny_model, tiny_adapter):
    bad = mismatched_adapter(tiny_adapter, tmp_path / "bad")
    versions = [
        ModelVersion(str(tiny_model), adapter=str(tiny_adapter), name="good"),
        ModelVersion(str(tiny_model), adapter=str(bad), name="broken"),
    ]
    with pytest.raises(
        MuscleError, match=rf"^version broken: adapter {re.escape(str(bad))} does not load on .*size mismatch"
    ):
        VersionGroup("hf", versions, batch_size=2)


# -- grouping --------------------------------------------------------------------------------


def test_versions_group_by_base_and_adapter_type(tmp_path, tiny_model, tiny_model_b, tiny_adapter, adapter_qv):
    other_type = Path(shutil.copytree(tiny_adapter, tmp_path / "ia3"))
    (other_type / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    link = tmp_path / "same_base"
    link.symlink_to(tiny_model)
    versions = [
        ModelVersion(str(tiny_model), adapter=str(tiny_adapter), name="compat"),
        ModelVersion(str(tiny_model_b), name="new"),
        ModelVersion(str(tiny_model), name="old"),
        ModelVersion(str(link), adapter=str(adapter_qv), name="control"),  # the same base by another path
        ModelVersion(str(tiny_model), adapter=str(other_type), name="ia3"),  # PEFT cannot mix types
        ModelVersion(str(tiny_model_b), adapter=str(tiny_adapter), name="new-compat"),
    ]
    assert group_versions("hf", versions) == [[0, 2, 3], [1, 5], [4]]
    assert group_versions("vllm", versions) == [[i] for i in range(6)]  # multiple choice: one per engine
    # Ray Data LLM: a base's adapters share an engine; a version without adapter has its own
    assert group_versions("vllm", versions, processor=True) == [[0, 3], [1], [2], [4], [5]]


def test_broken_adapter_files_are_refused_on_the_driver_naming_the_version(tmp_path, tiny_model, tiny_adapter):
    truncated = Path(shutil.copytree(tiny_adapter, tmp_path / "truncated"))
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    empty_config = Path(shutil.copytree(tiny_adapter, tmp_path / "config"))
    (empty_config / "adapter_config.json").write_text("{")
    no_weights = Path(shutil.copytree(tiny_adapter, tmp_path / "no_weights"))
    (no_weights / "adapter_model.safetensors").unlink()
    good = ModelVersion(str(tiny_model), adapter=str(tiny_adapter), name="good")
    for path, why in [
        (truncated, "adapter_model.safetensors is not a readable safetensors file"),
        (empty_config, "unreadable adapter_config.json"),
        (no_weights, "no adapter_model.safetensors"),
    ]:
        with pytest.raises(MuscleError, match=rf"^version bad: adapter {re.escape(str(path))}: {why}"):
            group_versions("hf", [good, ModelVersion(str(tiny_model), adapter=str(path), name="bad")])

    # the job refuses it before Ray starts or anything is written
    data = write_mc(tmp_path / "mc.jsonl", 8)
    cfg = config(data, tmp_path / "out", [("good", tiny_model, tiny_adapter), ("bad", tiny_model, truncated)])
    with pytest.raises(MuscleError, match="version bad: adapter"):
        run_score(cfg, log=lambda *_: None)
    assert not list((tmp_path / "out").glob("*/mc_jsonl/*.parquet"))


# -- the job through Ray ---------------------------------------------------------------------


def write_mc(path: Path, n: int) -> Path:
    rows = [
        {
            "id": f"q{i}",
            "context": "The quick brown fox" + " jumps" * (i % 5),
            "choices": ["over the lazy dog", "a man", "12 apples" * (1 + i % 3)],
            "label": i % 3,
        }
        for i in range(n)
    ]
    lines = [json.dumps(r) for r in rows]
    lines[5] = "{not json"  # a bad row: quarantined for every version
    path.write_text("\n".join(lines) + "\n")
    return path


def config(data: Path, out: Path, versions, **kw) -> ScoreConfig:
    return ScoreConfig(
        versions=[{"name": n, "base": str(b), **({"adapter": str(a)} if a else {})} for n, b, a in versions],
        task="mc_jsonl",
        data=str(data),
        out=str(out),
        **{"shard_size": 6, "batch_size": 4, "workers": 1, **kw},
    )


def per_version_reference(data: Path, versions) -> dict[str, dict[str, dict]]:
    """Each version scored alone in this process (base + adapter by `load_model`, the way one
    pass per version loads it): version -> id -> results row."""
    task = get_task("mc_jsonl")
    items = []
    for rec in task.records(str(data)):
        try:
            items.append((rec.row, task.parse(rec)))
        except MuscleError:
            continue
    out = {}
    for name, base, adapter in versions:
        scorer = HFScorer(ModelVersion(str(base), adapter=adapter and str(adapter), name=name), batch_size=4)
        out[name] = {r["id"]: r for r in score_instances(scorer, task, items, name)}
    return out


def tables(out: Path, names) -> dict[str, dict[str, dict]]:
    return {n: {r["id"]: r for r in read_results(out / n / "mc_jsonl").to_pylist()} for n in names}


@slow
def test_one_pass_per_base_scores_like_one_pass_per_version(
    tmp_path, ray_session, tiny_model, tiny_model_b, tiny_adapter, adapter_qv
):
    versions = [
        ("compat", tiny_model, tiny_adapter),
        ("new", tiny_model_b, None),
        ("old", tiny_model, None),
        ("control", tiny_model, adapter_qv),
    ]
    data = write_mc(tmp_path / "mc.jsonl", 20)
    log: list[str] = []
    progress: list[int] = []
    summaries = run_score(config(data, tmp_path / "out", versions), log=log.append, progress=progress.append)

    assert [s.version for s in summaries] == ["compat", "new", "old", "control"]
    assert sum(progress) == 4 * 20  # the caller's total: versions x rows
    assert sum("one pass" in line for line in log) == 1  # tiny_model's three versions; new alone
    by = {s.version: s for s in summaries}
    assert len(by["compat"].actors) == 1 and by["compat"].actors == by["old"].actors == by["control"].actors
    assert by["new"].actors != by["compat"].actors  # a pool of its own
    for s in summaries:
        assert (s.rows, s.errors, s.shards, s.scored, s.resumed_shards) == (19, 1, 4, 19, 0)
        assert pq.read_table(Path(s.out) / "errors.parquet").column("row").to_pylist() == [5]
        assert json.loads((Path(s.out) / "_run.json").read_text())["adapter"] == (
            str(Path(dict((n, a) for n, _, a in versions)[s.version]).resolve())
            if dict((n, a) for n, _, a in versions)[s.version]
            else None
        )
    assert [s["version"] for s in json.loads((tmp_path / "out" / "summary.json").read_text())] == list(by)

    got, ref = tables(tmp_path / "out", by), per_version_reference(data, versions)
    for name in by:
        assert got[name].keys() == ref[name].keys() and len(got[name]) == 19
        for k, row in got[name].items():
            want = ref[name][k]
            assert (row["prediction"], row["pred_norm"], row["version"], row["row"]) == (
                want["prediction"],
                want["pred_norm"],
                name,
                want["row"],
            )
            np.testing.assert_allclose(row["choice_logliks"], want["choice_logliks"], atol=1e-4, rtol=0)
    assert any(got["compat"][k]["choice_logliks"] != got["control"][k]["choice_logliks"] for k in got["old"])


@slow
def test_resume_rewrites_only_the_missing_shard(tmp_path, ray_session, tiny_model, tiny_adapter, adapter_qv):
    versions = [("compat", tiny_model, tiny_adapter), ("old", tiny_model, None), ("control", tiny_model, adapter_qv)]
    data = write_mc(tmp_path / "mc.jsonl", 14)
    out = tmp_path / "out"
    cfg = config(data, out, versions)
    run_score(cfg, log=lambda *_: None)
    before = tables(out, ["compat", "old", "control"])
    files = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob("*/mc_jsonl/*shard-*.parquet")}
    assert len(files) == 3 * 3 + 3  # 3 shards per version, the errors of shard 0 (row 5) per version

    gone = out / "control" / "mc_jsonl" / "shard-00001.parquet"
    gone.unlink()
    progress: list[int] = []
    summaries = run_score(cfg, log=lambda *_: None, progress=progress.append)

    assert sum(progress) == 6  # shard 1's rows, for control only
    assert [(s.version, s.scored, s.resumed_shards) for s in summaries] == [
        ("compat", 0, 3),
        ("old", 0, 3),
        ("control", 6, 2),
    ]
    after = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.glob("*/mc_jsonl/*shard-*.parquet")}
    assert after.keys() == files.keys()
    assert [f for f in files if after[f] != files[f]] == [gone]  # the missing one written, no other
    again = tables(out, ["compat", "old", "control"])
    for name in again:
        assert again[name].keys() == before[name].keys()
        for k in again[name]:
            np.testing.assert_allclose(again[name][k]["choice_logliks"], before[name][k]["choice_logliks"], atol=1e-5)
    assert all(s.errors == 1 for s in summaries)  # errors.parquet keeps the resumed shard's bad row


@slow
def test_an_adapter_that_fails_in_the_actor_stops_the_job_naming_it(tmp_path, ray_session, tiny_model, tiny_adapter):
    bad = mismatched_adapter(tiny_adapter, tmp_path / "bad")
    data = write_mc(tmp_path / "mc.jsonl", 6)
    cfg = config(data, tmp_path / "out", [("good", tiny_model, tiny_adapter), ("broken", tiny_model, bad)])
    with pytest.raises(MuscleError) as e:
        run_score(cfg, log=lambda *_: None)
    message = str(e.value)
    assert message.startswith(f"version broken: adapter {bad} does not load on ") and "size mismatch" in message
    assert "\n" not in message
