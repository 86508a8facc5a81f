"""Chat: messages rendered through the model's own chat template, answered in OpenAI's chat shapes.

A chat request is a completion of the rendered conversation. The replica renders `messages`
with the tokenizer's template (`apply_chat_template(..., add_generation_prompt=True)`) and
generates from it as from any prompt. The answer goes back as one `chat.completion`, or, when
streamed, as `chat.completion.chunk` server-sent events ending with `data: [DONE]`. The engines
generate a whole answer at a time, so a stream carries it in one content chunk: streaming
clients work, and the first token arrives with the last.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

from muscle_ray.scoring.encode import prefix_token_id
from muscle_ray.serving.api import ApiError
from muscle_ray.serving.engine_types import GenResult


def render(tokenizer, messages: list[dict], model: str) -> str:
    """The conversation as the model was trained to read it, ending where the assistant answers."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400,
            f"model: {model!r} has no chat template (its tokenizer_config.json sets no "
            "chat_template); send a prompt to /v1/completions instead",
            "model",
            code="no_chat_template",
        )
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:  # a template may refuse, e.g. roles that do not alternate
        raise ApiError(400, f"messages: the chat template of {model!r} refused them: {e}", "messages") from None


def encode(tokenizer, text: str) -> list[int]:
    """A rendered chat's token ids: the template wrote every special token it wants, so none are added."""
    return tokenizer.encode(text, add_special_tokens=False) or [prefix_token_id(tokenizer)]


def _usage(r: GenResult) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _token(text: str, logprob: float) -> dict:
    raw = None if text.startswith("token_id:") else list(text.encode())  # part of a character: no bytes
    return {"token": text, "logprob": logprob, "bytes": raw}


def chat_logprobs(block: dict | None) -> dict | None:
    """The completions logprobs block ({tokens, token_logprobs, top_logprobs}) in the chat shape."""
    if block is None:
        return None
    tops = block["top_logprobs"] or [{} for _ in block["tokens"]]
    return {
        "content": [
            {**_token(t, lp), "top_logprobs": [_token(a, v) for a, v in sorted(top.items(), key=lambda kv: -kv[1])]}
            for t, lp, top in zip(block["tokens"], block["token_logprobs"], tops)
        ],
        "refusal": None,
    }


def response(model: str, r: GenResult) -> dict:
    """One `chat.completion` object."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": chat_logprobs(r.logprobs),
                "finish_reason": r.finish_reason,
            }
        ],
        "usage": _usage(r),
    }


def stream(model: str, r: GenResult, include_usage: bool = False) -> Iterator[str]:
    """The answer as server-sent `chat.completion.chunk` events: the role, the content, the finish
    reason, the usage when asked (`stream_options.include_usage`), then `[DONE]`."""
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }
    usage = {"usage": None} if include_usage else {}

    def event(delta: dict, logprobs=None, finish_reason=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return f"data: {json.dumps({**head, 'choices': [choice], **usage})}\n\n"

    yield event({"role": "assistant", "content": ""})
    yield event({"content": r.text}, chat_logprobs(r.logprobs))
    yield event({}, finish_reason=r.finish_reason)
    if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(r)})}\n\n"
    yield "data: [DONE]\n\n"
