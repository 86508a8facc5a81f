"""Attacks on the real Ray Serve app, over loopback HTTP: a property-based fuzz of every endpoint
from the app's own OpenAPI schema, and a load with a model replica killed in the middle.

What must hold: no 5xx from anything the fuzz sends, every error in OpenAI's shape, and under
the kill every client gets JSON and at most 1% of requests fail (greedy requests are retried).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.slow

PORT = 18451
URL = f"http://127.0.0.1:{PORT}"
KEY, KEY_ENV = "attack-key-7", "MUSCLE_TEST_ATTACK_KEY"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVED = ["old", "new", "compat"]


@pytest.fixture(scope="module")
def app(tiny_model, tiny_chat_model_b, tiny_adapter, tmp_path_factory):
    """Base a serves old (no chat template); base b, with ChatML, serves new and compat."""
    import ray
    from ray import serve

    from muscle_ray.runtime import init_ray
    from muscle_ray.serving.app import build
    from muscle_ray.zoo.llama import random_lora_dir

    root = tmp_path_factory.mktemp("serve_attack")
    chat_b = tiny_chat_model_b
    args = {
        "bases": {
            "a": {"path": str(tiny_model), "models": {"old": str(tiny_adapter)}},
            "b": {
                "path": str(chat_b),
                "models": {"new": None, "compat": str(random_lora_dir(chat_b, root / "compat"))},
            },
        },
        "shadow": {"enabled": True, "out": str(root / "shadow")},
        "limits": {"max_prompt_tokens": 256, "max_tokens": 16, "max_body_bytes": 64_000, "max_prompt_chars": 4000},
        "api_key_env": KEY_ENV,
    }
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    deployments = {
        "model_a": small,
        "model_b": small,
        "gateway": {"ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": {KEY_ENV: KEY}}}},
    }
    init_ray(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        serve.run(
            build(args, deployments=deployments),
            name="attack",
            route_prefix="/",
            logging_config={"log_level": "WARNING"},
        )
        yield URL
    finally:
        serve.shutdown()
        ray.shutdown()


def openai_error(status: int, content_type: str, text: str) -> bool:
    if not content_type.startswith("application/json"):
        return False
    err = json.loads(text).get("error") if text.startswith("{") else None
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and status >= 400


def test_fuzz_every_endpoint_from_the_openapi_schema(app):
    """30 positive and 30 negative examples per operation, from /openapi.json with the model
    fields narrowed to the served names (else nearly every request would be a 404)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    raw = requests.get(f"{app}/openapi.json", headers=AUTH, timeout=30).json()
    schemas = raw["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        schemas[name]["properties"]["model"] = {"type": "string", "enum": SERVED}
    served_or_null = {"anyOf": [{"type": "string", "enum": SERVED}, {"type": "null"}]}
    for side in ("old", "new"):
        schemas["CompareRequest"]["properties"][side] = served_or_null
    schema = schemathesis.openapi.from_dict(raw)
    seen: dict[str, dict[int, int]] = {}
    bad: list[tuple] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/compare",
        "GET /v1/models",
        "GET /v1/stats",
    }
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            counts = seen.setdefault(f"{op.label} {mode.value}", {})

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=30,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def call(case):
                r = case.call(base_url=app, headers=AUTH, timeout=120)
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
                kind = (r.headers.get("content-type") or [""])[0]
                if r.status_code >= 500 or (r.status_code >= 400 and not openai_error(r.status_code, kind, r.text)):
                    bad.append((op.label, r.status_code, r.text[:300], getattr(case, "body", None)))

            try:
                call()
            except Unsatisfiable:  # no negative example exists for an operation without inputs
                assert mode == GenerationMode.NEGATIVE and not list(op.iter_parameters()), op.label
    assert not bad, bad[:5]
    for label in ("POST /v1/completions positive", "POST /v1/chat/completions positive"):
        assert seen[label].get(200, 0) >= 5, seen  # the fuzz got past validation into the models


def test_load_with_a_model_replica_killed_midway(app):
    """c=32, 320 greedy requests (completions, chat, compare); a model replica is killed after
    the first hundred: every client gets JSON, at most 1% fail, and each failure is a 503
    with Retry-After."""
    import ray

    bodies = [
        ("/v1/completions", {"model": "compat", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}),
        (
            "/v1/chat/completions",
            {"model": "new", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0},
        ),
        ("/v1/compare", {"prompt": "3 plus 4 is", "max_tokens": 6}),
        ("/v1/completions", {"model": "old", "prompt": ["a", "b"], "max_tokens": 4, "temperature": 0}),
    ]
    total, done, lock = 320, [], threading.Lock()
    killed_at: list[int] = []
    local = threading.local()

    def one(i: int):
        path, body = bodies[i % len(bodies)]
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        r = session.post(URL + path, json=body, headers=AUTH, timeout=180)
        result = (r.status_code, r.headers.get("content-type", ""), r.headers.get("retry-after"), r.text)
        with lock:
            done.append(result)
        return result

    def kill_when_busy():
        while len(done) < 100:
            time.sleep(0.05)
        (victim,) = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::attack#model_b#")
        ]
        killed_at.append(len(done))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(total)))
    killer.join(timeout=10)
    assert killed_at and killed_at[0] < total - 32, "the replica died with requests still coming"
    for status, kind, _, text in results:
        assert kind.startswith("application/json"), (status, kind, text[:200])
        json.loads(text)
    failed = [(s, retry, text) for s, _, retry, text in results if s != 200]
    assert len(failed) <= total // 100, failed
    for status, retry, text in failed:
        assert status == 503 and retry and openai_error(status, "application/json", text), (status, text)
    lost = requests.get(f"{URL}/v1/stats", headers=AUTH, timeout=30).json()["replica_lost"]
    assert lost["retried"] >= 1, lost  # the kill did land on requests in flight
