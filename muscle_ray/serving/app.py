"""The Ray Serve application: one model deployment per base, and a FastAPI gateway.

    client ── HTTP ──> gateway (http.py: /v1/models, /v1/completions, /v1/chat/completions,
                          │           /v1/compare, /v1/stats, /healthz; gateway.py: the work)
                          │  handles, called concurrently (asyncio.gather)
                          ├──> model_v1 (base v1 + its adapters: old)
                          └──> model_v2 (base v2 + its adapters: new, compat)

`build_app(args)` is the application builder named in `serve/config.yaml`
(`import_path: muscle_ray.serving.app:build_app`); `muscle serve` calls it too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from ray import serve

from muscle_ray.serving import chat
from muscle_ray.serving.api import ApiError
from muscle_ray.serving.config import Limits, ServeAppConfig, model_deployment_name, validate_app_config
from muscle_ray.serving.engine import make_engine
from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest, GenResult
from muscle_ray.serving.gateway import Gateway
from muscle_ray.serving.http import build_api


class ModelReplica:
    """One base model (loaded once) and its adapters: a request checked, tokenised, answered.

    The event loop only queues: tokenising, chat templates and the model run in worker threads,
    so a long prompt never stalls the requests next to it. A client's error is returned, not
    raised (Serve would log a traceback for it). `ModelServer` is this in Serve, batched.
    """

    def __init__(
        self,
        base: str,
        models: dict[str, str | None],
        backend: str = "hf",
        backend_options: dict | None = None,
        batch: dict | None = None,
        limits: dict | None = None,
    ):
        self.base, self.models = base, models
        self.limits = Limits(**(limits or {}))
        self.engine = make_engine(
            backend, base, models, batch_size=(batch or {}).get("max_batch_size", 8), options=backend_options
        )

    def info(self) -> dict:
        import torch

        return {
            "base": self.base,
            "models": self.models,
            "max_len": self.engine.max_len,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS"),
        }

    def _served(self, model: str) -> None:
        if model not in self.models:
            raise ApiError(404, f"model {model!r} is not served by this deployment", "model", code="model_not_found")

    def _prompt(self, model: str, prompt: str | None, messages: list[dict] | None) -> str:
        return chat.render(self.engine.tokenizer, messages, model) if messages is not None else cast(str, prompt)

    def _prompt_ids(self, model: str, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """A prompt's ids, or a chat's rendered through the model's template (in a worker thread)."""
        if messages is None:
            return self.engine.encode(cast(str, prompt))
        return chat.encode(self.engine.tokenizer, self._prompt(model, None, messages))

    async def complete(
        self,
        model: str,
        prompt: str | None,
        max_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        seed: int | None = None,
        messages: list[dict] | None = None,
        fit_context: bool = False,
    ) -> GenResult | ApiError:
        """A completion of `prompt`, or of the chat `messages`. With `fit_context`, `max_tokens`
        shrinks to what the context leaves after the prompt (a chat that set no limit)."""
        try:
            self._served(model)
            ids = await asyncio.to_thread(self._prompt_ids, model, prompt, messages)
            if len(ids) > self.limits.max_prompt_tokens:
                raise ApiError(
                    400,
                    f"prompt: {len(ids)} tokens, more than the limit of {self.limits.max_prompt_tokens}",
                    "prompt",
                    code="prompt_too_long",
                )
            if fit_context:
                max_tokens = min(max_tokens, self.engine.max_len - len(ids))
            if max_tokens < 0 or len(ids) + max_tokens > self.engine.max_len or (fit_context and max_tokens == 0):
                raise ApiError(
                    400,
                    f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                    f"the model's context length ({self.engine.max_len})",
                    "max_tokens",
                    code="context_length_exceeded",
                )
        except ApiError as e:
            return e
        return await self._generate(
            GenRequest(model, tuple(ids), max_tokens, tuple(stop), temperature, top_p, logprobs, echo, seed)
        )

    async def choose(
        self, model: str, prompt: str | None, choices: list[str], messages: list[dict] | None = None
    ) -> list[float] | ApiError:
        """log P(choice | prompt) per choice; the prompt may be a chat, rendered by the template."""
        try:
            self._served(model)
            text = await asyncio.to_thread(self._prompt, model, prompt, messages)
            n = await asyncio.to_thread(self.engine.choice_tokens, text, choices)
            limit = min(self.limits.max_prompt_tokens, self.engine.max_len)
            if n > limit:
                raise ApiError(
                    400,
                    f"prompt: prompt + choice is {n} tokens, more than the limit of {limit}",
                    "prompt",
                    code="prompt_too_long",
                )
        except ApiError as e:
            return e
        return await self._choose(ChoiceRequest(model, text, tuple(choices)))

    # One request at a time here; ModelServer batches them. The model runs in a worker thread,
    # and the engine's lock keeps one batch on the model at a time.
    async def _generate(self, req: GenRequest) -> GenResult:
        return (await asyncio.to_thread(self.engine.generate, [req]))[0]

    async def _choose(self, req: ChoiceRequest) -> list[float]:
        return (await asyncio.to_thread(self.engine.choice_logliks, [req]))[0]


@serve.deployment(name="model", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class ModelServer(ModelReplica):
    """A model replica in Serve: concurrent requests batched (`@serve.batch`), grouped by adapter
    by the engine, while the replica keeps queueing the next batch."""

    def __init__(
        self,
        base: str,
        models: dict[str, str | None],
        backend: str = "hf",
        backend_options: dict | None = None,
        batch: dict | None = None,
        limits: dict | None = None,
    ):
        super().__init__(base, models, backend, backend_options, batch, limits)
        batch = batch or {}
        batched: tuple[Any, ...] = (self._generate, self._choose)  # serve.batch wrappers
        for method in batched:
            method.set_max_batch_size(batch.get("max_batch_size", 8))
            method.set_batch_wait_timeout_s(batch.get("batch_wait_timeout_s", 0.005))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        return await asyncio.to_thread(self.engine.generate, reqs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _choose(self, reqs: list[ChoiceRequest]) -> list[list[float]]:
        return await asyncio.to_thread(self.engine.choice_logliks, reqs)


@serve.deployment(name="gateway", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress()
class GatewayDeployment(Gateway):
    """The gateway as a Serve deployment: its FastAPI app is built per replica, from its config."""

    def __serve_build_asgi_app__(self):
        return build_api(self)


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
        bases[key] = (
            cast(Any, ModelServer)
            .options(name=name, **deployments.get(name, {}))
            .bind(
                base.path,
                base.models,
                cfg.backend,
                cfg.backend_options,
                cfg.batch.model_dump(),
                cfg.limits.model_dump(),
            )
        )
    return cast(Any, GatewayDeployment).options(**deployments.get("gateway", {})).bind(bases, cfg.model_dump())
