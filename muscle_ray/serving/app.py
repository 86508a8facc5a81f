"""The Ray Serve application: one model deployment per base, and a FastAPI gateway.

    client ── HTTP ──> gateway (FastAPI: /v1/models, /v1/completions, /v1/compare, /healthz)
                          │  handles, called concurrently (asyncio.gather)
                          ├──> model_v1 (base v1 + its adapters: old)
                          └──> model_v2 (base v2 + its adapters: new, compat)

`build_app(args)` is the application builder named in `serve/config.yaml`
(`import_path: muscle_ray.serving.app:build_app`); `muscle serve` calls it too.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from muscle_ray.serving.api import ApiError, CompareRequest, CompletionRequest, completion_response, verdict
from muscle_ray.serving.config import Limits, ServeAppConfig, validate_app_config
from muscle_ray.serving.engine import make_engine
from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest, GenResult
from muscle_ray.serving.shadow import OutcomeCounter, ShadowLog, ShadowRecorder, close_recorders


def model_deployment_name(base_key: str) -> str:
    return f"model_{base_key}"


@serve.deployment(name="model", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ModelServer:
    """One base model (loaded once) and its adapters; requests batched, grouped by adapter."""

    def __init__(self, base: str, models: dict[str, str | None], backend: str = "hf",
                 backend_options: dict | None = None, batch: dict | None = None, limits: dict | None = None):
        batch = batch or {}
        self.base, self.models = base, models
        self.limits = Limits(**(limits or {}))
        self.engine = make_engine(backend, base, models, batch_size=batch.get("max_batch_size", 8),
                                  options=backend_options)
        batched: tuple[Any, ...] = (self._generate, self._choose)   # serve.batch wrappers
        for method in batched:
            method.set_max_batch_size(batch.get("max_batch_size", 8))
            method.set_batch_wait_timeout_s(batch.get("batch_wait_timeout_s", 0.005))

    def info(self) -> dict:
        import torch

        return {"base": self.base, "models": self.models, "max_len": self.engine.max_len, "pid": os.getpid(),
                "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}

    async def complete(self, model: str, prompt: str, max_tokens: int, stop: Sequence[str] = (),
                       temperature: float = 0.0, top_p: float = 1.0, logprobs: int | None = None,
                       echo: bool = False) -> GenResult | ApiError:
        """A completion, or the client's error returned (not raised: Serve would log a traceback)."""
        if model not in self.models:
            return ApiError(404, f"model {model!r} is not served on base {self.base}", "model", code="model_not_found")
        ids = self.engine.encode(prompt)
        if len(ids) > self.limits.max_prompt_tokens:
            return ApiError(400, f"prompt: {len(ids)} tokens, more than the limit of {self.limits.max_prompt_tokens}",
                           "prompt", code="prompt_too_long")
        if len(ids) + max_tokens > self.engine.max_len:
            return ApiError(400, f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"model's context length ({self.engine.max_len})", "max_tokens",
                           code="context_length_exceeded")
        return await self._generate(GenRequest(model, tuple(ids), max_tokens, tuple(stop), temperature, top_p,
                                               logprobs, echo))

    async def choose(self, model: str, prompt: str, choices: list[str]) -> list[float] | ApiError:
        if model not in self.models:
            return ApiError(404, f"model {model!r} is not served on base {self.base}", "model", code="model_not_found")
        n = self.engine.choice_tokens(prompt, choices)
        if n > min(self.limits.max_prompt_tokens, self.engine.max_len):
            return ApiError(400, f"prompt: prompt + choice is {n} tokens, more than the limit of "
                                f"{min(self.limits.max_prompt_tokens, self.engine.max_len)}", "prompt",
                           code="prompt_too_long")
        return await self._choose(ChoiceRequest(model, prompt, tuple(choices)))

    # The model runs in a worker thread so the replica keeps queueing the next batch meanwhile;
    # the engine's lock keeps one batch on the model at a time.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        return await asyncio.to_thread(self.engine.generate, reqs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _choose(self, reqs: list[ChoiceRequest]) -> list[list[float]]:
        return await asyncio.to_thread(self.engine.choice_logliks, reqs)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Serve runs the app's shutdown when a gateway replica stops (scale-down, redeploy, `serve
    shutdown`): the shadow rows still in memory are written then, not left to garbage collection."""
    yield
    await close_recorders()


api = FastAPI(title="muscle-ray serve", description="OpenAI-compatible completions and an old-vs-new compare endpoint.",
              lifespan=lifespan)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    """pydantic's report -> 400 with OpenAI's error object naming the first bad field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return JSONResponse(ApiError(400, f"{param or 'body'}: {err.get('msg')}", param).body(), status_code=400)


async def _result(response):
    """Await a deployment response, raising the client error a model deployment returned."""
    out = await response
    if isinstance(out, ApiError):
        raise out
    return out


@serve.deployment(name="gateway", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Gateway:
    """HTTP in front of the model deployments: auth, limits, routing, compare, shadow."""

    def __init__(self, bases: dict, config: dict):
        from muscle_ray.metrics.text import rouge

        self.cfg = ServeAppConfig.model_validate(config)
        self.handles = {name: bases[key] for name, key in self.cfg.base_of().items()}
        self.key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        rouge(["warm up"], ["warm up"], "rougeL")   # the first rouge-score call loads nltk's stemmer
        self.compare_counter = OutcomeCounter("muscle_compare_total", "compare requests by model pair: agree/disagree")
        self.flip_counter = OutcomeCounter("muscle_flips_total", "labelled compare requests by pair and flip verdict")
        self.shadow_counter = OutcomeCounter("muscle_shadow_total", "shadowed completions by pair and outcome")
        sh = self.cfg.shadow
        self.shadow = (ShadowRecorder(ShadowLog(sh.out, sh.flush_rows, sh.flush_seconds), self.shadow_counter)
                       if sh.enabled else None)

    # -- helpers -----------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    def _handle(self, model: str, param: str = "model"):
        if model not in self.handles:
            raise ApiError(404, f"{param}: no model named {model!r}; served: {sorted(self.handles)}", param,
                           code="model_not_found")
        return self.handles[model]

    def _limit(self, param: str, value: int, limit: int) -> None:
        if value > limit:
            raise ApiError(400, f"{param}: {value} is more than the limit of {limit}", param)

    # -- endpoints ---------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness for load balancers; open even when an API key is set (it reveals nothing)."""
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        data = []
        for key, base in self.cfg.bases.items():
            for name, adapter in base.models.items():
                data.append({"id": name, "object": "model", "created": 0, "owned_by": "muscle-ray",
                             "base": base.path, "adapter": adapter, "deployment": model_deployment_name(key)})
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> dict:
        self._authorize(request)
        lim = self.cfg.limits
        prompts = body.prompts()
        handle = self._handle(body.model)
        self._limit("prompt", len(prompts), lim.max_prompts)
        self._limit("max_tokens", body.max_tokens, lim.max_tokens)
        self._limit("stop", len(body.stop), lim.max_stops)
        self._limit("logprobs", body.logprobs or 0, lim.max_logprobs)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 is only meaningful with echo (scoring the prompt)", "max_tokens")
        kw = dict(max_tokens=body.max_tokens, stop=body.stop, temperature=body.temperature, top_p=body.top_p,
                  logprobs=body.logprobs, echo=body.echo)
        results: list[GenResult] = await asyncio.gather(
            *(_result(handle.complete.remote(body.model, p, **kw)) for p in prompts))
        twin = self.cfg.shadow.pairs.get(body.model)
        if self.shadow is not None and twin:   # after the answer, in the background: the client never waits
            shadow = [self.handles[twin].complete.remote(twin, p, **kw) for p in prompts]
            self.shadow.record(body.model, twin, prompts, [r.text for r in results], shadow)
        choices = [{"text": r.text, "index": i, "logprobs": r.logprobs, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        pt, ct = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        return completion_response(body.model, choices, {"prompt_tokens": pt, "completion_tokens": ct,
                                                         "total_tokens": pt + ct})

    @api.post("/v1/compare")
    async def compare(self, body: CompareRequest, request: Request) -> dict:
        from muscle_ray.metrics.text import exact_match, rouge

        self._authorize(request)
        old, new = body.old or self.cfg.compare.old, body.new or self.cfg.compare.new
        h_old, h_new = self._handle(old, "old"), self._handle(new, "new")
        if old == new:
            raise ApiError(400, f"new: names the same model as old ({old!r}); compare two models", "new")
        out: dict = {"object": "compare", "old": {"model": old}, "new": {"model": new}}
        if body.choices is not None:
            self._limit("choices", len(body.choices), self.cfg.limits.max_choices)
            if len(body.choices) < 2:
                raise ApiError(400, "choices: a multiple-choice request needs at least 2 choices", "choices")
            lo, ln = await asyncio.gather(_result(h_old.choose.remote(old, body.prompt, body.choices)),
                                          _result(h_new.choose.remote(new, body.prompt, body.choices)))
            po, pn = max(range(len(lo)), key=lo.__getitem__), max(range(len(ln)), key=ln.__getitem__)
            out["kind"] = "multiple_choice"
            out["old"].update(choice_logliks=lo, pick=po)
            out["new"].update(choice_logliks=ln, pick=pn)
            out["agree"] = po == pn
            right = (po == body.label, pn == body.label) if body.label is not None else None
        else:
            self._limit("max_tokens", body.max_tokens, self.cfg.limits.max_tokens)
            self._limit("stop", len(body.stop), self.cfg.limits.max_stops)
            kw = dict(max_tokens=body.max_tokens, stop=body.stop, temperature=body.temperature, logprobs=0)
            ro, rn = await asyncio.gather(_result(h_old.complete.remote(old, body.prompt, **kw)),
                                          _result(h_new.complete.remote(new, body.prompt, **kw)))
            for side, r in (("old", ro), ("new", rn)):
                out[side].update(text=r.text, finish_reason=r.finish_reason, tokens=r.logprobs["tokens"],
                                 token_logprobs=r.logprobs["token_logprobs"])
            out["kind"] = "generation"
            out["agree"] = bool(exact_match([rn.text], [ro.text])[0])
            out["rougeL"] = float(rouge([rn.text], [ro.text], "rougeL")[0])
            right = None
            if body.reference is not None:
                em = exact_match([ro.text, rn.text], [body.reference] * 2)
                right = (bool(em[0]), bool(em[1]))
        out["verdict"] = verdict(*right) if right is not None else None
        self.compare_counter.inc(old, new, "agree" if out["agree"] else "disagree")
        if out["verdict"]:
            self.flip_counter.inc(old, new, out["verdict"])
        return out

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict:
        """The in-memory counts behind the Prometheus counters, and the shadow files written."""
        self._authorize(request)
        return {"compare": self.compare_counter.as_list(), "flips": self.flip_counter.as_list(),
                "shadow": self.shadow_counter.as_list(),
                "shadow_files": [str(p) for p in self.shadow.log.files] if self.shadow else [],
                "shadow_pending": self.shadow.log.pending if self.shadow else 0}


def build_app(args: dict):
    """The application builder `serve run` / `serve deploy` call with the config's `args:` block."""
    return build(args)


def build(args: dict | ServeAppConfig, deployments: dict | None = None, root: str | Path | None = None):
    """The application from a `ServeAppConfig` (or its dict, see `serving.config`).

    `deployments` (name -> Serve options such as autoscaling_config, ray_actor_options) is what
    `serve run` applies from the config file by itself; `muscle serve` and tests pass it here.
    Relative paths are taken under `root` (default: the working directory).
    """
    cfg = validate_app_config(args).resolved(root)
    deployments = deployments or {}
    bases = {}
    for key, base in cfg.bases.items():
        name = model_deployment_name(key)
        bases[key] = cast(Any, ModelServer).options(name=name, **deployments.get(name, {})).bind(
            base.path, base.models, cfg.backend, cfg.backend_options, cfg.batch.model_dump(), cfg.limits.model_dump())
    return cast(Any, Gateway).options(**deployments.get("gateway", {})).bind(bases, cfg.model_dump())
