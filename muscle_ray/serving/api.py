"""The HTTP contract: OpenAI's completion and chat schemas, the compare endpoint, and errors.

Field names and response shapes follow OpenAI's `/v1/completions` and `/v1/chat/completions`,
so the official `openai` client works unchanged (prompts are text; token-id prompts are
refused). Fixed sanity bounds live here; the configurable limits (`config.Limits`) are checked
by the gateway. Unknown request fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


class ApiError(Exception):
    """A request the client must fix (4xx), rendered as OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.retry_after = retry_after  # seconds, sent as Retry-After (503s)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None

    def __reduce__(self):  # crosses Ray actor boundaries intact
        return (ApiError, (self.status, self.message, self.param, self.type, self.code, self.retry_after))


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every non-2xx answer of the gateway has this shape."""

    error: ErrorDetail


def _unicode(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800") that no tokenizer can encode: refused as a bad field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _greedy_when_tiny(t: float) -> float:
    """Dividing logits by a temperature near 0 overflows: below 1e-5 it means greedy (as in vLLM)."""
    return 0.0 if t < 1e-5 else t


Temperature = Annotated[float, Field(ge=0, le=2), AfterValidator(_greedy_when_tiny)]


def _stops(v):
    """OpenAI's `stop`: one string, a list, or null."""
    return [v] if isinstance(v, str) else (v or [])


class ContentPart(BaseModel):
    """A part of a chat message's content; only text is served."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None

    def as_template_input(self) -> dict:
        """What a chat template reads: role and plain text (OpenAI's `developer` is a system message)."""
        text = "".join(p.text for p in self.content) if isinstance(self.content, list) else (self.content or "")
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


def chat_input(messages: list[ChatMessage]) -> list[dict]:
    return [m.as_template_input() for m in messages]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: Text | list[Text]
    max_tokens: int = Field(16, ge=0)
    temperature: Temperature = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)  # one completion per prompt
    stop: list[Text] = []
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stream: Literal[False] = False  # streaming is offered for chat only

    @field_validator("stop", mode="before")
    @classmethod
    def _split_stop(cls, v):
        return _stops(v)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion; `messages` go through the model's chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # the older name of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)  # default: the server's limits.max_tokens
    temperature: Temperature = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stop: list[Text] = []
    seed: int | None = Field(None, ge=0, lt=2**63)  # sampling: same seed, same answer (best effort)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _split_stop(cls, v):
        return _stops(v)

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def completion_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompareRequest(BaseModel):
    """One prompt (or chat) for two models; with `choices`, a multiple-choice question (picks, flip)."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # instead of prompt: a chat
    choices: list[Text] | None = Field(None, min_length=2)  # continuations scored after the prompt, verbatim
    label: int | None = Field(None, ge=0)  # index of the right choice: gives the flip verdict
    reference: Text | None = None  # generation: the right answer (exact match) for a verdict
    old: str | None = None  # default: the config's compare.old
    new: str | None = None  # default: the config's compare.new (e.g. "compat")
    max_tokens: int = Field(16, ge=1)
    temperature: Temperature = 0.0
    stop: list[Text] = []

    @field_validator("stop", mode="before")
    @classmethod
    def _split_stop(cls, v):
        return _stops(v)

    @field_validator("choices")
    @classmethod
    def _no_empty_choice(cls, v):
        for i, c in enumerate(v or []):
            if not c:
                raise ValueError(f"choice {i} is empty: there is nothing to score")
        return v

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.label is not None and self.choices is None:
            raise ValueError("label needs choices (a multiple-choice request)")
        if self.label is not None and self.label >= len(self.choices or []):
            raise ValueError(f"label {self.label} is not an index of the {len(self.choices)} choices")
        if self.reference is not None and self.choices is not None:
            raise ValueError("reference is for generation; a multiple-choice request takes label")
        return self


def verdict(old_right: bool, new_right: bool) -> str:
    """MUSCLE's flip taxonomy for one instance (negative = old right, new wrong)."""
    return {
        (True, False): "negative",
        (False, True): "positive",
        (True, True): "both_right",
        (False, False): "both_wrong",
    }[(old_right, new_right)]


def completion_response(model: str, choices: list[dict], usage: dict) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }
