"""Serving without Ray Serve: config, request models, the engine, the shadow log, the CLI, and the
gateway's HTTP app on a real loopback server with real model replicas (tiny models) in-process."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import requests
from pydantic import ValidationError

from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion
from muscle_ray.scoring.hf import HFScorer
from muscle_ray.serving.api import ChatCompletionRequest, CompareRequest, CompletionRequest, verdict
from muscle_ray.serving.config import ServeAppConfig, read_serve_file, validate_app_config
from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest
from muscle_ray.serving.hf_engine import HFEngine
from muscle_ray.serving.shadow import OutcomeCounter, ShadowLog, ShadowRecorder
from muscle_ray.tasks.base import Instance

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "Question: How many apples are left? Answer:", "hi"]
KEY, KEY_ENV = "local-key-42", "MUSCLE_TEST_LOCAL_KEY"
AUTH = {"Authorization": f"Bearer {KEY}"}


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
    return {
        "new": random_lora_dir(tiny_model_b, root / "new", seed=1),
        "compat": random_lora_dir(tiny_model_b, root / "compat", seed=2),
    }


@pytest.fixture(scope="module")
def engine(tiny_model_b, adapters_b):
    return HFEngine(
        str(tiny_model_b), {"new": str(adapters_b["new"]), "compat": str(adapters_b["compat"]), "base": None}
    )


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
    assert cfg.bases["v1"].models == {"old": "runs/demo/adapters/pet_em/v1"}
    assert cfg.bases["v2"].models == {
        "new": "runs/demo/adapters/pet_em/v2",
        "compat": "runs/demo/adapters/pet_em/compat",
    }
    assert opts["http_options"]["host"] == "127.0.0.1"
    assert set(opts["deployments"]) == {"gateway", "model_v1", "model_v2"}
    for d in opts["deployments"].values():
        assert 0 < d["ray_actor_options"]["num_cpus"] <= 0.5
        assert d["autoscaling_config"]["min_replicas"] <= d["autoscaling_config"]["max_replicas"]


def test_config_errors_name_the_field(tiny_model, tmp_path):
    two = {
        "a": {"path": str(tiny_model), "models": {"old": None}},
        "b": {"path": str(tiny_model), "models": {"old": None}},
    }
    with pytest.raises(MuscleError, match="bases.*old.*unique"):
        validate_app_config({"bases": two})
    with pytest.raises(MuscleError, match="compare.new"):
        validate_app_config({"bases": {"a": {"path": str(tiny_model), "models": {"old": None}}}})
    with pytest.raises(MuscleError, match="'limits.max_tokens'"):
        validate_app_config({"bases": two, "limits": {"max_tokens": -1}})
    cfg = validate_app_config({"bases": {"a": {"path": "nowhere/v1", "models": {"old": None, "new": None}}}})
    with pytest.raises(MuscleError, match="bases.a model old: .*nowhere/v1.*config.json"):
        cfg.resolved(tmp_path)


def test_serve_file_deployment_options_are_validated(tmp_path):
    """Serve's per-deployment options fail on the driver with the file and field named, not as
    a pydantic traceback from Serve; unknown keys and deployment names are refused too."""
    shipped = (ROOT / "serve" / "config.yaml").read_text()
    cases = [
        (
            "max_replicas: 2, target_ongoing_requests: 64",
            'max_replicas: "x", target_ongoing_requests: 64',
            "applications[0].deployments[0].autoscaling_config.max_replicas",
        ),
        (
            "max_ongoing_requests: 256",
            "max_ongoing_requests: 256\n        max_ongoing: 9",
            "applications[0].deployments[0].max_ongoing",
        ),
        ("- name: model_v2", "- name: model_v3", "applications[0].deployments[2].name': no deployment named"),
        ("{num_cpus: 0.25}", "{num_cpus: lots}", "deployments[0].ray_actor_options.num_cpus"),
    ]
    for before, after, field in cases:
        assert before in shipped
        bad = tmp_path / "bad.yaml"
        bad.write_text(shipped.replace(before, after, 1))
        with pytest.raises(MuscleError, match=re.escape(f"{bad}: field '") + ".*" + re.escape(field)):
            read_serve_file(bad)
    assert read_serve_file(ROOT / "serve" / "config.yaml")[1]["deployments"]["gateway"]["max_ongoing_requests"] == 256


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
    # logits / 5e-324 overflow to inf: a temperature that small is greedy (found by the fuzz)
    assert CompletionRequest(model="new", prompt="x", temperature=5e-324).temperature == 0.0
    with pytest.raises(ValidationError, match="label needs choices"):
        CompareRequest(prompt="x", label=0)
    with pytest.raises(ValidationError, match="not an index"):
        CompareRequest(prompt="x", choices=["a", "b"], label=2)
    with pytest.raises(ValidationError):
        CompletionRequest(model="new", prompt="x", stream=True)
    # JSON can carry a lone surrogate; no tokenizer can encode one: a bad field, not a crash
    for bad in ({"prompt": "a\ud800"}, {"prompt": ["ok", "\udfff"]}, {"stop": ["\ud800"]}):
        with pytest.raises(ValidationError, match="lone surrogate"):
            CompletionRequest.model_validate({"model": "new", "prompt": "x", **bad})
    with pytest.raises(ValidationError, match="lone surrogate"):
        ChatCompletionRequest(model="new", messages=[{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}])
    with pytest.raises(ValidationError, match="choice 1 is empty"):
        CompareRequest(prompt="x", choices=["a", ""])
    with pytest.raises(ValidationError, match="at least 2"):
        CompareRequest(prompt="x", choices=[])
    with pytest.raises(ValidationError, match="either prompt or messages"):
        CompareRequest(prompt="x", messages=[{"role": "user", "content": "hi"}])
    chat = ChatCompletionRequest(
        model="new",
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
        ],
    )
    assert [m.as_template_input() for m in chat.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert chat.completion_tokens(99) == 99 and chat.stop == []
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest(model="new", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert [verdict(o, n) for o, n in [(True, False), (False, True), (True, True), (False, False)]] == [
        "negative",
        "positive",
        "both_right",
        "both_wrong",
    ]


# -- engine ------------------------------------------------------------------------------------
def test_greedy_completion_is_the_scoring_jobs_generation(engine, tiny_model_b, adapters_b):
    """Each adapter on the shared base generates what `muscle score` generates for that version."""
    for name, adapter in [("new", adapters_b["new"]), ("compat", adapters_b["compat"]), ("base", None)]:
        scorer = HFScorer(ModelVersion(str(tiny_model_b), adapter=str(adapter) if adapter else None))
        for stop, max_new in [(("o",), 12), ((), 8)]:
            ref = scorer.generate(
                [
                    Instance(id=p, task="t", kind="gen", contexts=[p], stop=list(stop), max_new_tokens=max_new)
                    for p in PROMPTS
                ]
            )
            got = engine.generate([GenRequest(name, tuple(engine.encode(p)), max_new, stop) for p in PROMPTS])
            assert [g.text for g in got] == [r.text for r in ref], (name, stop)
    texts = {
        n: engine.generate([GenRequest(n, tuple(engine.encode(PROMPTS[0])), 12)])[0].text
        for n in ("new", "compat", "base")
    }
    assert len(set(texts.values())) == 3  # the adapters really switch


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
    sampled = [
        engine.generate([GenRequest("new", tuple(engine.encode(p)), 12, temperature=1.0)])[0].text for p in PROMPTS
    ]
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
        assert sum(r.logprobs["token_logprobs"][-len(cont) :]) == pytest.approx(ll, abs=1e-4)


# -- shadow log --------------------------------------------------------------------------------
ROW = {
    "pair": "old->new",
    "model": "new",
    "shadow_model": "old",
    "prompt": "p",
    "output": "a",
    "shadow_output": "b",
    "rougeL": 0.0,
}


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
    assert log.flush() is None  # nothing pending: no empty files
    log.add(ROW)
    time.sleep(0.06)
    assert log.due()
    log.flush()
    files = sorted(f for f in (tmp_path / "shadow").iterdir() if not f.name.startswith("."))
    assert [f.suffix for f in files] == [".parquet", ".parquet"]  # no temporary files left
    assert pq.read_table(files[-1]).column("prompt").to_pylist() == ["p"]
    assert not list((tmp_path / "shadow" / ".journal").iterdir())  # every journal segment compacted


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
    assert [p.name for p in blocked.iterdir() if not p.name.startswith(".")] == [path.name]


KILLED_WRITER = """
import asyncio, sys
from muscle_ray.serving.shadow import OutcomeCounter, ShadowLog, ShadowRecorder

class Answer:
    text = "the twin's answer"

async def twin():
    return Answer()

async def main():
    rec = ShadowRecorder(ShadowLog(sys.argv[1], flush_rows=10_000, flush_seconds=3600),
                         OutcomeCounter("muscle_test_killed_total", "test"))
    for i in range(200):
        rec.record("new", "old", [f"prompt {i}"], ["an answer"], [twin()])
    while rec.log.pending < 200:
        await asyncio.sleep(0.01)
    print("recorded", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_shadow_rows_survive_sigkill(tmp_path):
    """A gateway process killed outright keeps every row it recorded: the journal is on disk,
    a live writer's journal is left alone, and the next log compacts the dead one's."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "shadow"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "recorded"
        assert ShadowLog(out).files == []  # the writer is alive: its journal is not touched
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not list(out.glob("*.parquet"))  # nothing was flushed before the kill
    log = ShadowLog(out)  # a restarted replica's log
    rows = [r for f in log.files for r in pq.read_table(f).to_pylist()]
    assert sorted(r["prompt"] for r in rows) == sorted(f"prompt {i}" for i in range(200))
    assert {(r["output"], r["shadow_output"], r["pair"]) for r in rows} == {
        ("an answer", "the twin's answer", "old->new")
    }
    assert not list((out / ".journal").iterdir()) and ShadowLog(out).files == []  # compacted once


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
    rec = ShadowRecorder(
        ShadowLog(out, flush_rows=2, flush_seconds=0.2), OutcomeCounter("muscle_test_shadow_total", "test")
    )

    async def until(done, seconds=10.0):
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert done()

    async def scenario():
        rec.record("new", "old", ["p1", "p2", "p3"], ["a", "same", "c"], [answer("x"), answer("same"), fail()])
        await until(lambda: sum("retrying" in r.getMessage() for r in caplog.records) >= 2)  # two ticks failed
        assert rec.log.pending == 1 and not out.is_dir()
        out.unlink()
        await until(lambda: rec.log.files)  # a later tick writes the row
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


# -- the gateway's HTTP app, on loopback, with real replicas in this process -------------------
class LocalHandle:
    """A model replica in this process, called the way the gateway calls a Serve handle."""

    def __init__(self, replica):
        self.replica = replica

    def __getattr__(self, method: str):
        return SimpleNamespace(remote=getattr(self.replica, method))


@contextmanager
def http_server(app):
    """`app` on a loopback port, served by uvicorn in a thread (with its lifespan)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def replicas(tiny_model, tiny_adapter, tiny_chat_model_b, adapters_b):
    """Base a (no chat template) serving old; base b (ChatML) serving new and compat."""
    from muscle_ray.serving.app import ModelReplica

    limits = {"max_prompt_tokens": 256, "max_tokens": 32, "max_body_bytes": 64_000, "max_prompt_chars": 4000}
    bases = {
        "a": {"path": str(tiny_model), "models": {"old": str(tiny_adapter)}},
        "b": {
            "path": str(tiny_chat_model_b),
            "models": {"new": str(adapters_b["new"]), "compat": str(adapters_b["compat"])},
        },
    }
    return {
        "bases": bases,
        "limits": limits,
        "handles": {k: LocalHandle(ModelReplica(b["path"], b["models"], limits=limits)) for k, b in bases.items()},
    }


def local_gateway(replicas, **config):
    from muscle_ray.serving.gateway import Gateway

    os.environ[KEY_ENV] = KEY
    try:
        return Gateway(
            replicas["handles"],
            {"bases": replicas["bases"], "limits": replicas["limits"], "api_key_env": KEY_ENV, **config},
        )
    finally:
        del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def url(replicas):
    from muscle_ray.serving.http import build_api

    with http_server(build_api(local_gateway(replicas))) as base:
        yield base


def is_openai_error(r: requests.Response, status: int, param: str | None = "-", code: str | None = "-") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param == "-" or err["param"] == param, err
    assert code == "-" or err["code"] == code, err
    return err


def test_every_error_has_openais_shape(url):
    """Framework answers too: no route (404), wrong method (405), bad JSON, bad fields, no key."""
    is_openai_error(requests.get(f"{url}/v1/nowhere", headers=AUTH, timeout=30), 404, None, "not_found")
    r = requests.get(f"{url}/v1/completions", headers=AUTH, timeout=30)
    assert is_openai_error(r, 405, None, "method_not_allowed") and r.headers["allow"] == "POST"
    is_openai_error(
        requests.post(
            f"{url}/v1/completions", data=b"{not json", timeout=30, headers={**AUTH, "content-type": "application/json"}
        ),
        400,
    )
    is_openai_error(
        requests.post(
            f"{url}/v1/completions", data=b"\xff\xfe", timeout=30, headers={**AUTH, "content-type": "application/json"}
        ),
        400,
    )
    is_openai_error(requests.post(f"{url}/v1/completions", json=[1, 2], headers=AUTH, timeout=30), 400)
    is_openai_error(
        requests.post(f"{url}/v1/chat/completions", json={"model": "new", "messages": []}, headers=AUTH, timeout=30),
        400,
        "messages",
    )
    for path in ("/v1/models", "/openapi.json", "/v1/nowhere"):  # the key comes first, even for a 404
        is_openai_error(requests.get(url + path, timeout=30), 401, None, "invalid_api_key")
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}


def test_docs_follow_the_key_and_models_show_names_only(url, replicas):
    schema = requests.get(f"{url}/openapi.json", headers=AUTH, timeout=30).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/compare", "/v1/models"} <= set(schema["paths"])
    for page in ("/docs", "/redoc"):
        is_openai_error(requests.get(url + page, headers=AUTH, timeout=30), 404)
    body = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30)
    assert [(m["id"], m["base"], m["adapter"], m["deployment"]) for m in body.json()["data"]] == [
        ("old", "a", True, "model_a"),
        ("new", "b", True, "model_b"),
        ("compat", "b", True, "model_b"),
    ]
    for p in (replicas["bases"]["a"]["path"], replicas["bases"]["b"]["path"], "/tmp", os.sep + "pytest"):
        assert p not in body.text


def test_oversized_bodies_are_refused_before_parsing(url):
    """413 by Content-Length, and by counting a chunked body, without reading what is beyond."""
    big = json.dumps({"model": "new", "prompt": "x" * 70_000}).encode()
    t0 = time.monotonic()
    is_openai_error(
        requests.post(
            f"{url}/v1/completions", data=big, timeout=30, headers={**AUTH, "content-type": "application/json"}
        ),
        413,
        None,
        "request_too_large",
    )
    chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))  # no Content-Length: Transfer-Encoding chunked
    err = is_openai_error(
        requests.post(
            f"{url}/v1/completions", data=chunks, timeout=30, headers={**AUTH, "content-type": "application/json"}
        ),
        413,
    )
    assert "64000" in err["message"] and time.monotonic() - t0 < 5
    ok = requests.post(
        f"{url}/v1/completions", json={"model": "new", "prompt": "hi", "max_tokens": 2}, headers=AUTH, timeout=30
    )
    assert ok.status_code == 200, ok.text


def test_long_prompts_are_refused_by_characters_before_tokenising(url):
    long = "word " * 801  # 4005 characters: over limits.max_prompt_chars (4000)
    chat = [{"role": "system", "content": long[:2000]}, {"role": "user", "content": long[2000:]}]
    for path, body, param in [
        ("/v1/completions", {"model": "new", "prompt": ["hi", long]}, "prompt"),
        ("/v1/chat/completions", {"model": "new", "messages": chat}, "messages"),
        ("/v1/compare", {"prompt": long[:3999], "choices": [" a", " bb"]}, "choices"),
    ]:
        err = is_openai_error(
            requests.post(url + path, json=body, headers=AUTH, timeout=30), 400, param, "prompt_too_long"
        )
        assert "characters" in err["message"]


def test_tokenising_leaves_the_replicas_event_loop(replicas):
    """A huge prompt is tokenised in a worker thread: a small request next to it is answered first."""
    import asyncio

    replica = replicas["handles"]["b"].replica
    done: list[str] = []

    async def ask(name, prompt):
        out = await replica.complete("new", prompt, 2)
        done.append(name)
        return out

    async def both():
        return await asyncio.gather(ask("huge", "word " * 300_000), ask("small", "hi"))

    huge, small = asyncio.run(both())
    assert done == ["small", "huge"]
    assert small.completion_tokens == 2 and huge.code == "prompt_too_long"  # the token limit still holds


def test_bad_unicode_and_empty_choices_are_400(url):
    """A lone surrogate reaches no tokenizer; an empty choice is not scored as log-lik 0."""
    cases = [
        ("/v1/completions", '{"model": "new", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "new", "prompt": "a", "stop": ["\\udc00"]}', "stop.0"),
        (
            "/v1/chat/completions",
            '{"model": "new", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.0.content",
        ),
        ("/v1/compare", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/compare", '{"prompt": "q", "choices": [" a", ""]}', "choices"),
        ("/v1/compare", '{"prompt": "q", "choices": []}', "choices"),
    ]
    for path, body, param in cases:
        r = requests.post(
            url + path, data=body.encode(), headers={**AUTH, "content-type": "application/json"}, timeout=30
        )
        is_openai_error(r, 400, param)


class Dying(LocalHandle):
    """A replica whose process dies under the next `deaths` requests (what ray.kill does to them)."""

    def __init__(self, replica, deaths: int):
        super().__init__(replica)
        self.deaths = deaths

    def __getattr__(self, method: str):
        async def remote(*args, **kwargs):
            if self.deaths:
                self.deaths -= 1
                from ray.exceptions import ActorDiedError

                raise ActorDiedError()
            return await getattr(self.replica, method)(*args, **kwargs)

        return SimpleNamespace(remote=remote)


def test_a_lost_replica_is_retried_once_for_greedy_requests_else_503(replicas):
    import asyncio

    from muscle_ray.serving.api import ApiError

    gw = local_gateway(replicas)
    b = replicas["handles"]["b"].replica
    greedy = CompletionRequest(model="new", prompt="hi", max_tokens=3, temperature=0)
    gw.handles["new"] = Dying(b, deaths=1)
    assert asyncio.run(gw.completions(greedy))["choices"][0]["text"]  # asked again: answered
    for dying, body in [
        (Dying(b, deaths=2), greedy),  # lost twice
        (Dying(b, deaths=1), CompletionRequest(model="new", prompt="hi", max_tokens=3)),
    ]:  # sampled
        gw.handles["new"] = dying
        with pytest.raises(ApiError) as e:
            asyncio.run(gw.completions(body))
        assert (e.value.status, e.value.code, e.value.headers()) == (503, "replica_lost", {"Retry-After": "1"})
    assert gw.stats()["replica_lost"] == {"retried": 2, "failed": 2}


def test_chat_completions_with_the_openai_client(url, tiny_chat_model_b, engine):
    """The chat template renders the messages; greedy answers are the engine's completion of
    that text, streamed or not; logprobs in the chat shape."""
    from openai import BadRequestError, OpenAI
    from transformers import AutoTokenizer

    from muscle_ray.serving import chat

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "3 plus 4 is"}]
    out = client.chat.completions.create(model="new", messages=messages, max_tokens=8, temperature=0)
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_b)
    text = chat.render(tok, messages, "new")
    assert text.endswith("<|im_start|>assistant\n") and "You add numbers." in text
    ids = tuple(chat.encode(tok, text))
    want = engine.generate([GenRequest("new", ids, 8)])[0]
    assert out.object == "chat.completion" and out.model == "new"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want.text
    assert out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == want.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="new",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.total_tokens == len(ids) + want.completion_tokens
    raw = requests.post(
        f"{url}/v1/chat/completions",
        headers=AUTH,
        timeout=60,
        stream=True,
        json={"model": "new", "messages": messages, "max_tokens": 4, "stream": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert [line for line in raw.iter_lines() if line][-1] == b"data: [DONE]"

    lp = (
        client.chat.completions.create(
            model="compat", messages=messages, max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=2
        )
        .choices[0]
        .logprobs.content
    )
    assert len(lp) == 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    assert all(abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5 for t in lp)  # greedy: the best alternative
    fill = client.chat.completions.create(model="new", messages=messages, temperature=0)  # no max_tokens
    assert fill.usage.completion_tokens == 32 or fill.choices[0].finish_reason == "stop"  # limits.max_tokens
    seeded = [
        client.chat.completions.create(model="new", messages=messages, max_tokens=8, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    with pytest.raises(BadRequestError, match="'old' has no chat template"):
        client.chat.completions.create(model="old", messages=messages)


def test_compare_takes_messages(url, tiny_chat_model_b, engine):
    from transformers import AutoTokenizer

    from muscle_ray.serving import chat

    messages = [{"role": "user", "content": "Is 7 odd?"}]
    gen = requests.post(
        f"{url}/v1/compare",
        headers=AUTH,
        timeout=60,
        json={"messages": messages, "old": "new", "new": "compat", "max_tokens": 6},
    ).json()
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_b)
    ids = tuple(chat.encode(tok, chat.render(tok, messages, "new")))
    assert gen["old"]["text"] == engine.generate([GenRequest("new", ids, 6)])[0].text
    mc = requests.post(
        f"{url}/v1/compare",
        headers=AUTH,
        timeout=60,
        json={"messages": messages, "old": "new", "new": "compat", "choices": [" yes", " no"], "label": 0},
    ).json()
    (lls,) = engine.choice_logliks([ChoiceRequest("compat", chat.render(tok, messages, "compat"), (" yes", " no"))])
    assert mc["kind"] == "multiple_choice" and mc["new"]["choice_logliks"] == pytest.approx(lls, abs=1e-4)
    r = requests.post(f"{url}/v1/compare", headers=AUTH, timeout=60, json={"messages": messages})  # old: no template
    is_openai_error(r, 400, "model", "no_chat_template")


def test_gateway_shutdown_writes_pending_shadow_rows(replicas, tmp_path):
    """The FastAPI lifespan Serve runs when a gateway replica stops compacts the shadow journal."""
    import asyncio

    from muscle_ray.serving.http import build_api

    out = tmp_path / "shadow"
    gw = local_gateway(
        replicas,
        shadow={"enabled": True, "pairs": {"compat": "new"}, "out": str(out), "flush_rows": 100, "flush_seconds": 3600},
    )
    api = build_api(gw)
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]

    async def serve_then_stop():
        async with api.router.lifespan_context(api):
            await gw.completions(CompletionRequest(model="compat", prompt=prompts, max_tokens=6, temperature=0))
            deadline = time.monotonic() + 30
            while sum(c for c in gw.shadow_counter.counts.values()) < len(prompts) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert gw.shadow.log.pending > 0 and not gw.shadow.log.files
            return gw.shadow.log.pending

    pending = asyncio.run(serve_then_stop())
    rows = [r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == pending and {r["pair"] for r in rows} == {"new->compat"}
