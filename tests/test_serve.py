"""Serving pieces without Ray Serve: config, request models, the engine, the shadow log, the CLI."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion
from muscle_ray.scoring.hf import HFScorer
from muscle_ray.serving.api import CompareRequest, CompletionRequest, verdict
from muscle_ray.serving.config import ServeAppConfig, read_serve_file, validate_app_config
from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest
from muscle_ray.serving.hf_engine import HFEngine
from muscle_ray.serving.shadow import OutcomeCounter, ShadowLog, ShadowRecorder
from muscle_ray.tasks.base import Instance

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "Question: How many apples are left? Answer:", "hi"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a busy 2-core machine: several threads only spin against each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def adapters_b(tiny_model_b, tmp_path_factory):
    """Two adapters on the updated base: `new` and `compat`."""
    from muscle_ray.zoo.llama import random_lora_dir

    root = tmp_path_factory.mktemp("serve_lora")
    return {"new": random_lora_dir(tiny_model_b, root / "new", seed=1),
            "compat": random_lora_dir(tiny_model_b, root / "compat", seed=2)}


@pytest.fixture(scope="module")
def engine(tiny_model_b, adapters_b):
    return HFEngine(str(tiny_model_b), {"new": str(adapters_b["new"]), "compat": str(adapters_b["compat"]),
                                        "base": None})


def test_model_names_need_not_be_peft_names(tiny_model_b, adapters_b):
    e = HFEngine(str(tiny_model_b), {"default": str(adapters_b["compat"]), "v2.1": str(adapters_b["new"])})
    ids = tuple(e.encode(PROMPTS[0]))
    texts = [e.generate([GenRequest(n, ids, 8)])[0].text for n in ("default", "v2.1")]
    assert texts[0] != texts[1]


# -- config ------------------------------------------------------------------------------------
def test_shipped_config_points_at_the_demo_and_is_safe():
    args, opts = read_serve_file(ROOT / "serve" / "config.yaml")
    cfg = validate_app_config(args)
    assert cfg.bases["v1"].path == "runs/demo/zoo/v1"
    assert cfg.bases["v1"].models == {"old": "runs/demo/adapters/sum_em/v1"}
    assert cfg.bases["v2"].models == {"new": "runs/demo/adapters/sum_em/v2",
                                      "compat": "runs/demo/adapters/sum_em/compat"}
    assert opts["http_options"]["host"] == "127.0.0.1"
    assert set(opts["deployments"]) == {"gateway", "model_v1", "model_v2"}
    for d in opts["deployments"].values():
        assert 0 < d["ray_actor_options"]["num_cpus"] <= 0.5
        assert d["autoscaling_config"]["min_replicas"] <= d["autoscaling_config"]["max_replicas"]


def test_config_errors_name_the_field(tiny_model, tmp_path):
    two = {"a": {"path": str(tiny_model), "models": {"old": None}},
           "b": {"path": str(tiny_model), "models": {"old": None}}}
    with pytest.raises(MuscleError, match="bases.*old.*unique"):
        validate_app_config({"bases": two})
    with pytest.raises(MuscleError, match="compare.new"):
        validate_app_config({"bases": {"a": {"path": str(tiny_model), "models": {"old": None}}}})
    with pytest.raises(MuscleError, match="'limits.max_tokens'"):
        validate_app_config({"bases": two, "limits": {"max_tokens": -1}})
    cfg = validate_app_config({"bases": {"a": {"path": "nowhere/v1", "models": {"old": None, "new": None}}}})
    with pytest.raises(MuscleError, match="bases.a model old: .*nowhere/v1.*config.json"):
        cfg.resolved(tmp_path)


def test_relative_paths_resolve_under_the_launch_directory(tiny_model, tiny_adapter, tmp_path):
    (tmp_path / "m").symlink_to(tiny_model)
    (tmp_path / "a").symlink_to(tiny_adapter)
    cfg = ServeAppConfig(bases={"v1": {"path": "m", "models": {"old": "a", "new": None}}}).resolved(tmp_path)
    assert Path(cfg.bases["v1"].path) == tiny_model.resolve()
    assert Path(cfg.bases["v1"].models["old"]) == tiny_adapter.resolve()
    assert Path(cfg.shadow.out).is_absolute()


def test_cli_without_demo_outputs_exits_2(tmp_path, monkeypatch, capsys):
    from muscle_ray.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--config", str(ROOT / "serve" / "config.yaml")]) == 2
    assert "runs/demo/zoo/v1" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2


# -- request models ----------------------------------------------------------------------------
def test_request_models():
    r = CompletionRequest(model="new", prompt="x", stop="\n", temperature=0)
    assert r.stop == ["\n"] and r.prompts() == ["x"] and r.max_tokens == 16
    with pytest.raises(ValidationError, match="label needs choices"):
        CompareRequest(prompt="x", label=0)
    with pytest.raises(ValidationError, match="not an index"):
        CompareRequest(prompt="x", choices=["a", "b"], label=2)
    with pytest.raises(ValidationError):
        CompletionRequest(model="new", prompt="x", stream=True)
    assert [verdict(o, n) for o, n in [(True, False), (False, True), (True, True), (False, False)]] == \
        ["negative", "positive", "both_right", "both_wrong"]


# -- engine ------------------------------------------------------------------------------------
def test_greedy_completion_is_the_scoring_jobs_generation(engine, tiny_model_b, adapters_b):
    """Each adapter on the shared base generates what `muscle score` generates for that version."""
    for name, adapter in [("new", adapters_b["new"]), ("compat", adapters_b["compat"]), ("base", None)]:
        scorer = HFScorer(ModelVersion(str(tiny_model_b), adapter=str(adapter) if adapter else None))
        for stop, max_new in [(("o",), 12), ((), 8)]:
            ref = scorer.generate([Instance(id=p, task="t", kind="gen", contexts=[p], stop=list(stop),
                                            max_new_tokens=max_new) for p in PROMPTS])
            got = engine.generate([GenRequest(name, tuple(engine.encode(p)), max_new, stop) for p in PROMPTS])
            assert [g.text for g in got] == [r.text for r in ref], (name, stop)
    texts = {n: engine.generate([GenRequest(n, tuple(engine.encode(PROMPTS[0])), 12)])[0].text
             for n in ("new", "compat", "base")}
    assert len(set(texts.values())) == 3   # the adapters really switch


def test_mixed_batch_groups_by_adapter(engine):
    """One batch holding requests for several adapters answers each as if it came alone."""
    reqs = [GenRequest(n, tuple(engine.encode(p)), 6) for p in PROMPTS for n in ("new", "compat", "base")]
    alone = [engine.generate([r])[0].text for r in reqs]
    assert [g.text for g in engine.generate(reqs)] == alone


def test_finish_reason_and_logprobs(engine):
    ids = tuple(engine.encode(PROMPTS[0]))
    full = engine.generate([GenRequest("new", ids, 12, logprobs=2)])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 12
    lp = full.logprobs
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 12
    assert all(x <= 0 for x in lp["token_logprobs"]) and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == len(PROMPTS[0])
    # greedy picks the most likely token: its log-prob is the best of the top alternatives
    assert all(abs(max(t.values()) - x) < 1e-5 for t, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
    # the generation's own logits give the log-probs a teacher-forced pass (echo) gives
    echoed = engine.generate([GenRequest("new", ids, 12, logprobs=2, echo=True)])[0]
    assert echoed.text == PROMPTS[0] + full.text and len(echoed.logprobs["tokens"]) == len(ids) + 12
    assert echoed.logprobs["token_logprobs"][-12:] == pytest.approx(lp["token_logprobs"], abs=1e-4)
    stop = full.text[3]
    cut = engine.generate([GenRequest("new", ids, 12, (stop,), logprobs=0)])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text.split(stop)[0]
    sampled = [engine.generate([GenRequest("new", tuple(engine.encode(p)), 12, temperature=1.0)])[0].text
               for p in PROMPTS]
    greedy = [engine.generate([GenRequest("new", tuple(engine.encode(p)), 12)])[0].text for p in PROMPTS]
    assert sampled != greedy


def test_echo_logprobs_agree_with_choice_logliks(engine):
    """Scoring a prompt with echo gives the multiple-choice log-likelihoods the scoring job computes."""
    from muscle_ray.scoring.encode import encode_pair

    context, choices = "The quick brown fox", [" jumps over", " sleeps", " 12 apples"]
    (lls,) = engine.choice_logliks([ChoiceRequest("compat", context, tuple(choices))])
    for c, ll in zip(choices, lls):
        _, cont = encode_pair(engine.tokenizer, context, c)
        r = engine.generate([GenRequest("compat", tuple(engine.encode(context + c)), 0, logprobs=0, echo=True)])[0]
        assert r.text == context + c and r.logprobs["token_logprobs"][0] is None
        assert sum(r.logprobs["token_logprobs"][-len(cont):]) == pytest.approx(ll, abs=1e-4)


# -- shadow log --------------------------------------------------------------------------------
ROW = {"pair": "old->new", "model": "new", "shadow_model": "old", "prompt": "p", "output": "a",
       "shadow_output": "b", "rougeL": 0.0}


def test_shadow_log_writes_whole_batches(tmp_path):
    import time

    log = ShadowLog(tmp_path / "shadow", flush_rows=2, flush_seconds=0.05)
    log.add(ROW)
    assert log.pending == 1 and not log.due()
    log.add(ROW)
    assert log.due()
    path = log.flush()
    assert path is not None and log.pending == 0
    assert pq.read_table(path).num_rows == 2
    assert log.flush() is None                       # nothing pending: no empty files
    log.add(ROW)
    time.sleep(0.06)
    assert log.due()
    log.flush()
    files = sorted((tmp_path / "shadow").iterdir())
    assert [f.suffix for f in files] == [".parquet", ".parquet"]   # no temporary files left
    assert pq.read_table(files[-1]).column("prompt").to_pylist() == ["p"]


def test_shadow_log_keeps_rows_a_failed_write_could_not_write(tmp_path):
    blocked = tmp_path / "shadow"
    blocked.write_text("a file where the directory should be")
    log = ShadowLog(blocked, flush_rows=10, flush_seconds=60)
    log.add({**ROW, "prompt": "first"})
    with pytest.raises(OSError):
        log.flush()
    log.add({**ROW, "prompt": "second"})
    assert log.pending == 2
    blocked.unlink()
    path = log.flush()
    assert pq.read_table(path).column("prompt").to_pylist() == ["first", "second"]
    assert [p.name for p in blocked.iterdir()] == [path.name]


class Answer:
    def __init__(self, text: str):
        self.text = text


async def answer(text: str):
    return Answer(text)


async def fail():
    raise RuntimeError("replica died")


def test_shadow_recorder_logs_failures_retries_writes_and_flushes_on_close(tmp_path, caplog):
    """A twin that fails is logged and counted; a failed write is logged and retried on the
    next tick without losing rows; closing writes what is left."""
    import asyncio
    import logging
    import time

    out = tmp_path / "shadow"
    out.write_text("blocks the directory")
    rec = ShadowRecorder(ShadowLog(out, flush_rows=2, flush_seconds=0.2),
                         OutcomeCounter("muscle_test_shadow_total", "test"))

    async def until(done, seconds=10.0):
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert done()

    async def scenario():
        rec.record("new", "old", ["p1", "p2", "p3"], ["a", "same", "c"], [answer("x"), answer("same"), fail()])
        await until(lambda: sum("retrying" in r.getMessage() for r in caplog.records) >= 2)   # two ticks failed
        assert rec.log.pending == 1 and not out.is_dir()
        out.unlink()
        await until(lambda: rec.log.files)   # a later tick writes the row
        assert rec.log.pending == 0 and len(rec.log.files) == 1
        rec.record("new", "old", ["p4"], ["d"], [answer("y")])
        await rec.close()

    with caplog.at_level(logging.WARNING, logger="muscle_ray.serving.shadow"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records]
    assert any("old did not answer a prompt sent to new" in w and "replica died" in w for w in warnings)
    assert any("retrying on the next tick" in w for w in warnings)
    counts = {k: c for (_, _, k), c in rec.counter.counts.items()}
    assert counts == {"agree": 1, "disagree": 2, "error": 1}
    rows = [r for f in rec.log.files for r in pq.read_table(f).to_pylist()]
    assert [(r["prompt"], r["output"], r["shadow_output"]) for r in rows] == [("p1", "a", "x"), ("p4", "d", "y")]


def test_gateway_app_shutdown_writes_pending_shadow_rows(tmp_path):
    """The FastAPI lifespan Serve runs when a gateway replica stops flushes the shadow log."""
    import asyncio

    from muscle_ray.serving.app import api

    rec = ShadowRecorder(ShadowLog(tmp_path / "shadow", flush_rows=100, flush_seconds=3600),
                         OutcomeCounter("muscle_test_shadow_total", "test"))

    async def serve_then_stop():
        async with api.router.lifespan_context(api):
            rec.record("new", "old", ["p"], ["a"], [answer("b")])
            await asyncio.sleep(0.05)
            assert rec.log.pending == 1 and not rec.log.files
        assert rec.log.pending == 0

    asyncio.run(serve_then_stop())
    assert pq.read_table(rec.log.files[0]).column("prompt").to_pylist() == ["p"]
