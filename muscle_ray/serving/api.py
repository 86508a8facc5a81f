"""The HTTP contract: OpenAI's completion schema, the compare endpoint, and errors.

Field names and response shapes follow OpenAI's legacy `/v1/completions`, so the official
`openai` client works unchanged (prompts are text; token-id prompts are refused). Fixed
sanity bounds live here; the configurable limits (`config.Limits`) are checked by the gateway.
Unknown request fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ApiError(Exception):
    """A request the client must fix (4xx), rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # crosses Ray actor boundaries intact
        return (ApiError, (self.status, self.message, self.param, self.type, self.code))


def _stops(v):
    """OpenAI's `stop`: one string, a list, or null."""
    return [v] if isinstance(v, str) else (v or [])


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)   # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)                 # one completion per prompt
    stop: list[str] = []
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stream: Literal[False] = False                # streaming is not offered

    @field_validator("stop", mode="before")
    @classmethod
    def _split_stop(cls, v):
        return _stops(v)

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompareRequest(BaseModel):
    """One prompt for two models; with `choices`, a multiple-choice question (picks, flip)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    choices: list[str] | None = None     # continuations scored after the prompt, verbatim
    label: int | None = Field(None, ge=0)  # index of the right choice: gives the flip verdict
    reference: str | None = None         # generation: the right answer (exact match) for a verdict
    old: str | None = None               # default: the config's compare.old
    new: str | None = None               # default: the config's compare.new (e.g. "compat")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    stop: list[str] = []

    @field_validator("stop", mode="before")
    @classmethod
    def _split_stop(cls, v):
        return _stops(v)

    @model_validator(mode="after")
    def _check(self):
        if self.label is not None and self.choices is None:
            raise ValueError("label needs choices (a multiple-choice request)")
        if self.label is not None and self.label >= len(self.choices or []):
            raise ValueError(f"label {self.label} is not an index of the {len(self.choices)} choices")
        if self.reference is not None and self.choices is not None:
            raise ValueError("reference is for generation; a multiple-choice request takes label")
        return self


def verdict(old_right: bool, new_right: bool) -> str:
    """MUSCLE's flip taxonomy for one instance (negative = old right, new wrong)."""
    return {(True, False): "negative", (False, True): "positive",
            (True, True): "both_right", (False, False): "both_wrong"}[(old_right, new_right)]


def completion_response(model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}
