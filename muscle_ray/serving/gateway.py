"""The gateway's work behind the HTTP routes: limits, routing, compare, shadow, lost replicas.

A `Gateway` routes each request to the model deployment that serves its model, checks the
configured limits first (sizes before anything is tokenised), calls the replicas (old and new
concurrently for a compare) and shapes the answer. A replica that dies mid-request (the actor
killed, its node lost) costs a greedy request nothing: it is asked once more, and Serve routes
the retry to a live replica. Anything else that cannot be answered now is 503 with Retry-After.

`handles` are Ray Serve deployment handles in the app (`app.GatewayDeployment`); anything
called the same way (`handle.complete.remote(...)` returning an awaitable) works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from muscle_ray.serving.api import (
    ApiError,
    ChatCompletionRequest,
    CompareRequest,
    CompletionRequest,
    chat_input,
    completion_response,
    verdict,
)
from muscle_ray.serving.config import ServeAppConfig, model_deployment_name
from muscle_ray.serving.engine_types import GenResult
from muscle_ray.serving.shadow import OutcomeCounter, ShadowLog, ShadowRecorder

logger = logging.getLogger(__name__)

# The replica is gone (killed, crashed, its node lost): the request never ran to the end.
REPLICA_LOST = (
    ray_errors.RayActorError,
    ray_errors.ActorUnavailableError,
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    serve_errors.ReplicaUnavailableError,
)
# No replica can take it now (queues full, deployment not up): ask again later.
UNAVAILABLE = (serve_errors.BackPressureError, serve_errors.DeploymentUnavailableError)
RETRY_AFTER_S = 1


class Gateway:
    def __init__(self, bases: dict[str, Any], config: dict | ServeAppConfig):
        from muscle_ray.metrics.text import rouge

        self.cfg = config if isinstance(config, ServeAppConfig) else ServeAppConfig.model_validate(config)
        self.handles = {name: bases[key] for name, key in self.cfg.base_of().items()}
        self.key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        self.lost = {"retried": 0, "failed": 0}  # requests whose replica died under them
        rouge(["warm up"], ["warm up"], "rougeL")  # the first rouge-score call loads nltk's stemmer
        self.compare_counter = OutcomeCounter("muscle_compare_total", "compare requests by model pair: agree/disagree")
        self.flip_counter = OutcomeCounter("muscle_flips_total", "labelled compare requests by pair and flip verdict")
        self.shadow_counter = OutcomeCounter("muscle_shadow_total", "shadowed completions by pair and outcome")
        sh = self.cfg.shadow
        self.shadow = (
            ShadowRecorder(ShadowLog(sh.out, sh.flush_rows, sh.flush_seconds), self.shadow_counter)
            if sh.enabled
            else None
        )

    async def close(self) -> None:
        """At shutdown: the shadow rows still held are written."""
        if self.shadow is not None:
            await self.shadow.close()

    # -- checks ------------------------------------------------------------------------------
    def _served(self, model: str, param: str = "model") -> str:
        if model not in self.handles:
            raise ApiError(
                404, f"{param}: no model named {model!r}; served: {sorted(self.handles)}", param, code="model_not_found"
            )
        return model

    def _limit(self, param: str, value: int, limit: int) -> None:
        if value > limit:
            raise ApiError(400, f"{param}: {value} is more than the limit of {limit}", param)

    def _chars(self, param: str, n: int) -> None:
        """Prompt size in characters, checked before a replica spends time tokenising it."""
        limit = self.cfg.limits.max_prompt_chars
        if n > limit:
            raise ApiError(
                400, f"{param}: {n} characters, more than the limit of {limit}", param, code="prompt_too_long"
            )

    # -- calling replicas ----------------------------------------------------------------------
    async def _ask(self, model: str, method: str, *args, retry: bool = False, **kwargs):
        """`method(model, *args, **kwargs)` on a replica serving `model`; its client error is
        raised as ApiError. A replica lost mid-request is asked once more when `retry`
        (idempotent requests); else 503."""
        for attempt in (1, 2):
            try:
                out = await getattr(self.handles[model], method).remote(model, *args, **kwargs)
            except REPLICA_LOST as e:
                self.lost["retried" if retry and attempt == 1 else "failed"] += 1
                if retry and attempt == 1:
                    logger.warning(
                        "a replica serving %s was lost mid-request (%s); asking again", model, type(e).__name__
                    )
                    continue
                raise ApiError(
                    503,
                    f"model {model!r}: its replica was lost mid-request ({type(e).__name__}); try again",
                    type="server_error",
                    code="replica_lost",
                    retry_after=RETRY_AFTER_S,
                ) from None
            except UNAVAILABLE as e:
                raise ApiError(
                    503,
                    f"model {model!r} cannot take more requests now ({type(e).__name__}); try again",
                    type="server_error",
                    code="overloaded",
                    retry_after=RETRY_AFTER_S,
                ) from None
            if isinstance(out, ApiError):
                raise out
            return out

    # -- endpoints ---------------------------------------------------------------------------
    def models(self) -> dict:
        """OpenAI's model list; names only (no host paths): the base key and its deployment."""
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "muscle-ray",
                "base": key,
                "adapter": adapter is not None,
                "deployment": model_deployment_name(key),
            }
            for key, base in self.cfg.bases.items()
            for name, adapter in base.models.items()
        ]
        return {"object": "list", "data": data}

    async def completions(self, body: CompletionRequest) -> dict:
        lim = self.cfg.limits
        model, prompts = self._served(body.model), body.prompts()
        self._limit("prompt", len(prompts), lim.max_prompts)
        for p in prompts:
            self._chars("prompt", len(p))
        self._limit("max_tokens", body.max_tokens, lim.max_tokens)
        self._limit("stop", len(body.stop), lim.max_stops)
        self._limit("logprobs", body.logprobs or 0, lim.max_logprobs)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 is only meaningful with echo (scoring the prompt)", "max_tokens")
        kw = dict(
            max_tokens=body.max_tokens,
            stop=body.stop,
            temperature=body.temperature,
            top_p=body.top_p,
            logprobs=body.logprobs,
            echo=body.echo,
        )
        results: list[GenResult] = await asyncio.gather(
            *(self._ask(model, "complete", p, retry=body.temperature == 0, **kw) for p in prompts)
        )
        self._shadow(model, prompts, results, [((p,), {}) for p in prompts], kw)
        choices = [
            {"text": r.text, "index": i, "logprobs": r.logprobs, "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        pt, ct = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        return completion_response(
            model, choices, {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        )

    async def chat(self, body: ChatCompletionRequest) -> GenResult:
        """The assistant's answer to `messages` (shaped by `chat.response` / `chat.stream`)."""
        lim = self.cfg.limits
        model, messages = self._served(body.model), chat_input(body.messages)
        self._chars("messages", sum(len(m["content"]) for m in messages))
        asked = body.max_completion_tokens or body.max_tokens
        self._limit("max_completion_tokens" if body.max_completion_tokens else "max_tokens", asked or 0, lim.max_tokens)
        self._limit("stop", len(body.stop), lim.max_stops)
        self._limit("top_logprobs", body.top_logprobs or 0, lim.max_logprobs)
        kw = dict(
            max_tokens=asked or lim.max_tokens,
            stop=body.stop,
            temperature=body.temperature,
            top_p=body.top_p,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            seed=body.seed,
            messages=messages,
            fit_context=asked is None,
        )  # no max_tokens: as much as the context leaves
        result = await self._ask(model, "complete", None, retry=body.temperature == 0, **kw)
        self._shadow(model, [json.dumps(messages, ensure_ascii=False)], [result], [((None,), {})], kw)
        return result

    def _shadow(self, model: str, prompts: list[str], results: list[GenResult], args: list[tuple], kw: dict) -> None:
        """The twin gets the same requests in the background, after the client has its answer."""
        twin = self.cfg.shadow.pairs.get(model)
        if self.shadow is None or not twin:
            return
        answers = [self._ask(twin, "complete", *a, **{**kw, **k}) for a, k in args]
        self.shadow.record(model, twin, prompts, [r.text for r in results], answers)

    async def compare(self, body: CompareRequest) -> dict:
        from muscle_ray.metrics.text import exact_match, rouge

        lim = self.cfg.limits
        old, new = body.old or self.cfg.compare.old, body.new or self.cfg.compare.new
        self._served(old, "old")
        self._served(new, "new")
        if old == new:
            raise ApiError(400, f"new: names the same model as old ({old!r}); compare two models", "new")
        messages = chat_input(body.messages) if body.messages is not None else None
        prompt_chars = len(body.prompt or "") if messages is None else sum(len(m["content"]) for m in messages)
        self._chars("messages" if messages else "prompt", prompt_chars)
        out: dict = {"object": "compare", "old": {"model": old}, "new": {"model": new}}
        if body.choices is not None:
            self._limit("choices", len(body.choices), lim.max_choices)
            self._chars("choices", prompt_chars + max(map(len, body.choices)))
            kw: dict = dict(messages=messages, retry=True)
            lo, ln = await asyncio.gather(
                self._ask(old, "choose", body.prompt, body.choices, **kw),
                self._ask(new, "choose", body.prompt, body.choices, **kw),
            )
            po, pn = max(range(len(lo)), key=lo.__getitem__), max(range(len(ln)), key=ln.__getitem__)
            out["kind"] = "multiple_choice"
            out["old"].update(choice_logliks=lo, pick=po)
            out["new"].update(choice_logliks=ln, pick=pn)
            out["agree"] = po == pn
            right = (po == body.label, pn == body.label) if body.label is not None else None
        else:
            self._limit("max_tokens", body.max_tokens, lim.max_tokens)
            self._limit("stop", len(body.stop), lim.max_stops)
            kw = dict(
                max_tokens=body.max_tokens,
                stop=body.stop,
                temperature=body.temperature,
                logprobs=0,
                messages=messages,
                retry=body.temperature == 0,
            )
            ro, rn = await asyncio.gather(
                self._ask(old, "complete", body.prompt, **kw), self._ask(new, "complete", body.prompt, **kw)
            )
            for side, r in (("old", ro), ("new", rn)):
                out[side].update(
                    text=r.text,
                    finish_reason=r.finish_reason,
                    tokens=r.logprobs["tokens"],
                    token_logprobs=r.logprobs["token_logprobs"],
                )
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

    def stats(self) -> dict:
        """The in-memory counts behind the Prometheus counters, and the shadow files written."""
        return {
            "compare": self.compare_counter.as_list(),
            "flips": self.flip_counter.as_list(),
            "shadow": self.shadow_counter.as_list(),
            "shadow_files": [str(p) for p in self.shadow.log.files] if self.shadow else [],
            "shadow_pending": self.shadow.log.pending if self.shadow else 0,
            "replica_lost": self.lost,
        }
