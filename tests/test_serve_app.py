"""The real Ray Serve app on tiny local models, called over HTTP (openai client and requests).

One app serves the whole module (starting Serve is the slow part): base A holds `old`, base B
(with a chat template) holds `new` and `compat`; shadow mode is on and an API key is set.
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
import requests

pytestmark = pytest.mark.slow

PORT = 18431
URL = f"http://127.0.0.1:{PORT}"
METRICS_PORT = PORT + 1
KEY = "test-key-0123"
KEY_ENV = "MUSCLE_TEST_SERVE_KEY"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The quick brown fox", "Question: How many apples are left? Answer:", "hi"]


@pytest.fixture(scope="module")
def models(tiny_model, tiny_chat_model_b, tiny_adapter, tmp_path_factory):
    from muscle_ray.zoo.llama import random_lora_dir

    root = tmp_path_factory.mktemp("serve_app")
    chat_b = tiny_chat_model_b
    return {
        "old": (tiny_model, tiny_adapter),
        "new": (chat_b, random_lora_dir(chat_b, root / "new", seed=1)),
        "compat": (chat_b, random_lora_dir(chat_b, root / "compat", seed=2)),
        "shadow": root / "shadow",
    }


@pytest.fixture(scope="module")
def app(models):
    import ray
    from ray import serve

    from muscle_ray.runtime import init_ray
    from muscle_ray.serving.app import build

    args = {
        "bases": {
            "a": {"path": str(models["old"][0]), "models": {"old": str(models["old"][1])}},
            "b": {
                "path": str(models["new"][0]),
                "models": {"new": str(models["new"][1]), "compat": str(models["compat"][1])},
            },
        },
        "shadow": {"enabled": True, "out": str(models["shadow"]), "flush_rows": 2, "flush_seconds": 1},
        "limits": {"max_prompt_tokens": 64, "max_tokens": 32, "max_choices": 4},
        "api_key_env": KEY_ENV,
    }
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    deployments = {
        "model_a": small,
        "model_b": small,
        "gateway": {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": {KEY_ENV: KEY}}}},
    }
    # Prometheus export on a known port, reported every second (Ray's default is 10 s)
    init_ray(num_cpus=2, _metrics_export_port=METRICS_PORT, _system_config={"metrics_report_interval_ms": 1000})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(
            build(args, deployments=deployments),
            name="muscle",
            route_prefix="/",
            logging_config={"log_level": "WARNING"},
        )
        yield URL
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(app):
    from openai import OpenAI

    return OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0, timeout=30)


def scorer(models, name):
    from muscle_ray.models import ModelVersion
    from muscle_ray.scoring.hf import HFScorer

    base, adapter = models[name]
    return HFScorer(ModelVersion(str(base), adapter=str(adapter), name=name))


def post(path: str, body: dict, headers=AUTH) -> requests.Response:
    return requests.post(URL + path, json=body, headers=headers, timeout=60)


def test_models_listed_with_their_base_and_deployment_by_name(app, client, models):
    assert [m.id for m in client.models.list().data] == ["old", "new", "compat"]
    r = requests.get(f"{app}/v1/models", headers=AUTH, timeout=30)
    data = {m["id"]: m for m in r.json()["data"]}
    assert (data["compat"]["base"], data["compat"]["adapter"]) == ("b", True)
    assert data["new"]["deployment"] == data["compat"]["deployment"] == "model_b" != data["old"]["deployment"]
    assert str(models["compat"][0]) not in r.text and str(models["compat"][1]) not in r.text  # no host paths


def test_chat_through_serve_with_the_openai_client(app, client, models):
    """Chat answers are the greedy completion of the rendered conversation; the stream passes
    through Serve's proxy as server-sent events."""
    from muscle_ray.serving import chat
    from muscle_ray.serving.engine_types import GenRequest
    from muscle_ray.serving.hf_engine import HFEngine

    messages = [{"role": "user", "content": "3 plus 4 is"}]
    out = client.chat.completions.create(model="compat", messages=messages, max_tokens=8, temperature=0)
    engine = HFEngine(str(models["compat"][0]), {"compat": str(models["compat"][1])})
    ids = chat.encode(engine.tokenizer, chat.render(engine.tokenizer, messages, "compat"))
    assert out.choices[0].message.content == engine.generate([GenRequest("compat", tuple(ids), 8)])[0].text
    chunks = list(
        client.chat.completions.create(model="compat", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_greedy_completions_equal_the_scoring_jobs_generation(app, client, models):
    from muscle_ray.tasks.base import Instance

    for name in ("old", "new", "compat"):
        ref = scorer(models, name).generate(
            [Instance(id=p, task="t", kind="gen", contexts=[p], stop=["o"], max_new_tokens=10) for p in PROMPTS]
        )
        out = client.completions.create(model=name, prompt=PROMPTS, max_tokens=10, temperature=0, stop=["o"])
        assert out.object == "text_completion" and out.model == name
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [r.text for r in ref]
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    plain = post(
        "/v1/completions",
        {"model": "new", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True},
    ).json()
    lp = plain["choices"][0]["logprobs"]
    assert plain["choices"][0]["text"].startswith(PROMPTS[0])
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert plain["choices"][0]["finish_reason"] == "length"


def test_compare_generation(app, client):
    body = post("/v1/compare", {"prompt": PROMPTS[0], "max_tokens": 8}).json()
    assert body["kind"] == "generation" and body["old"]["model"] == "old" and body["new"]["model"] == "new"
    for side in ("old", "new"):
        assert len(body[side]["tokens"]) == len(body[side]["token_logprobs"]) > 0
        direct = client.completions.create(model=body[side]["model"], prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert body[side]["text"] == direct.choices[0].text
    assert body["agree"] == (body["old"]["text"].strip() == body["new"]["text"].strip())
    assert 0.0 <= body["rougeL"] <= 1.0 and body["verdict"] is None
    right = post(
        "/v1/compare", {"prompt": PROMPTS[0], "max_tokens": 8, "new": "compat", "reference": body["old"]["text"]}
    ).json()
    assert right["new"]["model"] == "compat" and right["verdict"] in ("negative", "both_right")
    assert (right["verdict"] == "both_right") == (right["new"]["text"].strip() == body["old"]["text"].strip())


def test_compare_multiple_choice_verdicts_on_a_built_flip(app, models):
    """Picks computed with the scoring job first; labels then chosen to make each verdict."""
    from muscle_ray.tasks.base import Instance

    choices = [" jumps over the dog", " sleeps", " 12 apples", " a man"]
    qs = [
        Instance(id=str(i), task="t", kind="mc", contexts=[c], continuations=choices, choice_chars=[1] * 4)
        for i, c in enumerate(
            [
                "The quick brown fox",
                "Question: How many",
                "hi",
                "The trophy fits",
                "A B C",
                "Once upon a time",
                "Answer:",
                "The cat",
            ]
        )
    ]
    old = [max(range(4), key=o.logliks.__getitem__) for o in scorer(models, "old").loglikelihoods(qs)]
    new = [max(range(4), key=o.logliks.__getitem__) for o in scorer(models, "new").loglikelihoods(qs)]
    differ = next(i for i in range(len(qs)) if old[i] != new[i])
    same = next(i for i in range(len(qs)) if old[i] == new[i])
    other = next(j for j in range(4) if j not in (old[differ], new[differ]))
    cases = [
        (differ, old[differ], "negative"),
        (differ, new[differ], "positive"),
        (differ, other, "both_wrong"),
        (same, old[same], "both_right"),
    ]
    for q, label, want in cases:
        body = post("/v1/compare", {"prompt": qs[q].contexts[0], "choices": choices, "label": label}).json()
        assert body["kind"] == "multiple_choice" and body["verdict"] == want
        assert (body["old"]["pick"], body["new"]["pick"]) == (old[q], new[q])
        assert len(body["old"]["choice_logliks"]) == len(body["new"]["choice_logliks"]) == 4
        assert body["agree"] == (old[q] == new[q])
    flips = {
        (s["old"], s["new"], s["outcome"]): s["count"]
        for s in requests.get(f"{URL}/v1/stats", headers=AUTH, timeout=30).json()["flips"]
    }
    assert flips[("old", "new", "negative")] >= 1 and flips[("old", "new", "positive")] >= 1


def test_shadow_log_written(app, client, models):
    before = {
        (s["outcome"]): s["count"]
        for s in requests.get(f"{URL}/v1/stats", headers=AUTH, timeout=30).json()["shadow"]
        if s["new"] == "compat"
    }
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]
    out = client.completions.create(model="compat", prompt=prompts, max_tokens=8, temperature=0)
    ours = {c.index: c.text for c in out.choices}
    old = {
        c.index: c.text
        for c in client.completions.create(model="old", prompt=prompts, max_tokens=8, temperature=0).choices
    }
    disagree = {prompts[i] for i in ours if ours[i].strip() != old[i].strip()}
    assert disagree, "random old and compat models should disagree somewhere"
    deadline, rows = time.time() + 30, []
    while time.time() < deadline:
        files = sorted(models["shadow"].glob("*.parquet")) if models["shadow"].is_dir() else []
        rows = [r for f in files for r in pq.read_table(f).to_pylist() if r["prompt"] in prompts]
        if {r["prompt"] for r in rows} >= disagree:
            break
        time.sleep(0.5)
    assert {r["prompt"] for r in rows} == disagree
    for r in rows:
        assert r["shadow_model"] == "old" and r["pair"] == "old->compat"
        assert r["output"] == ours[prompts.index(r["prompt"])] and r["shadow_output"] == old[prompts.index(r["prompt"])]
    assert not list(models["shadow"].glob(".*.tmp"))
    after = {
        (s["outcome"]): s["count"]
        for s in requests.get(f"{URL}/v1/stats", headers=AUTH, timeout=30).json()["shadow"]
        if s["new"] == "compat"
    }
    assert after.get("disagree", 0) - before.get("disagree", 0) == len(disagree)
    assert after.get("agree", 0) - before.get("agree", 0) == len(prompts) - len(disagree)


def test_prometheus_counters_exported(app):
    """Flips and shadow outcomes per model pair reach Ray's Prometheus endpoint."""
    import re

    want = [
        r'ray_muscle_flips_total\{[^}]*new="new"[^}]*old="old"[^}]*outcome="negative"[^}]*\} ([0-9.]+)',
        r'ray_muscle_shadow_total\{[^}]*new="compat"[^}]*old="old"[^}]*outcome="disagree"[^}]*\} ([0-9.]+)',
    ]
    deadline, text = time.time() + 20, ""
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
        if all(re.search(w, text) for w in want):
            break
        time.sleep(0.5)
    for w in want:
        m = re.search(w, text)
        assert m and float(m.group(1)) >= 1, w


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", {"model": "new", "prompt": "word " * 200, "max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"model": "new", "prompt": "hi", "max_tokens": 33}, 400, "max_tokens"),
        ("/v1/completions", {"model": "new", "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ("/v1/completions", {"model": "new", "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
        ("/v1/completions", {"model": "new", "prompt": ["hi"] * 17}, 400, "prompt"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/compare", {"prompt": "hi", "choices": ["a", "b", "c", "d", "e"]}, 400, "choices"),
        ("/v1/compare", {"prompt": "hi", "label": 1}, 400, None),
        ("/v1/compare", {"prompt": "hi", "new": "old"}, 400, "new"),
        ("/v1/compare", {"prompt": "hi", "new": "gpt-5"}, 404, "new"),
    ],
)
def test_bad_requests_answer_4xx_naming_the_field(app, path, body, status, param):
    r = post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param


def test_openai_client_sees_errors_and_malformed_json_is_400(app, client):
    import openai

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="new", prompt="hi", max_tokens=1000)
    r = requests.post(
        f"{URL}/v1/completions", data="{not json", headers={**AUTH, "content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400 and "error" in r.json()


def test_api_key_required_everywhere_but_healthz(app):
    import openai
    from openai import OpenAI

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert requests.get(f"{URL}/v1/models", headers=headers, timeout=30).status_code == 401
        assert post("/v1/completions", {"model": "new", "prompt": "hi"}, headers=headers).status_code == 401
        r = post("/v1/compare", {"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{URL}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{URL}/openapi.json", timeout=30).status_code == 401
    assert "/v1/chat/completions" in requests.get(f"{URL}/openapi.json", headers=AUTH, timeout=30).json()["paths"]
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{URL}/v1", api_key="wrong", max_retries=0).models.list()


def test_killed_replica_is_replaced(app, client):
    """Kill the replica holding base B; Serve starts another and later requests succeed."""
    import ray

    def replicas():
        return {
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::muscle#model_b#")
        }

    before = client.completions.create(model="compat", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    (victim,) = replicas()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline, after = time.time() + 90, None
    while time.time() < deadline:
        try:
            after = client.completions.create(model="compat", prompt=PROMPTS[0], max_tokens=8, temperature=0)
            if replicas() - {victim}:
                break
        except Exception:  # noqa: BLE001 - the request may land while the replica is down
            pass
        time.sleep(0.5)
    assert after is not None and after.choices[0].text == before.choices[0].text
    assert replicas() and victim not in replicas()
    for _ in range(3):
        assert post("/v1/compare", {"prompt": PROMPTS[1], "max_tokens": 4, "new": "compat"}).status_code == 200


def test_shadow_rows_held_are_written_when_the_gateway_stops(app, models, tmp_path):
    """A second app whose shadow log would wait an hour: deleting it (the gateway replica's
    graceful shutdown) compacts the rows its journal holds."""
    from ray import serve

    from muscle_ray.serving.app import build

    out = tmp_path / "late_shadow"
    args = {
        "bases": {
            "b": {
                "path": str(models["new"][0]),
                "models": {"new": str(models["new"][1]), "compat": str(models["compat"][1])},
            }
        },
        "compare": {"old": "new", "new": "compat"},
        "api_key_env": None,
        "shadow": {
            "enabled": True,
            "pairs": {"compat": "new"},
            "out": str(out),
            "flush_rows": 1000,
            "flush_seconds": 3600,
        },
    }
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    serve.run(
        build(args, deployments={"model_b": small, "gateway": small}),
        name="late",
        route_prefix="/late",
        logging_config={"log_level": "WARNING"},
    )
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS]
    r = requests.post(
        f"{URL}/late/v1/completions",
        timeout=60,
        json={"model": "compat", "prompt": prompts, "max_tokens": 8, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    deadline, stats = time.time() + 30, {}
    while time.time() < deadline:
        stats = requests.get(f"{URL}/late/v1/stats", timeout=30).json()
        if sum(s["count"] for s in stats["shadow"]) == len(prompts):
            break
        time.sleep(0.5)
    pending = stats["shadow_pending"]
    assert pending > 0 and not stats["shadow_files"] and not list(out.glob("*.parquet"))
    assert list((out / ".journal").glob("*.jsonl"))  # held on disk meanwhile, not only in memory
    serve.delete("late")
    rows = [r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == pending and {r["pair"] for r in rows} == {"new->compat"}
