"""What a serving engine is: one base model held once, several adapters on it, chosen per request.

A model deployment (`app.ModelServer`) holds one `Engine` and hands it batches of requests
that may name different adapters. Two engines implement it: `hf_engine.HFEngine` (transformers
and PEFT, CPU or GPU) and `vllm_engine.VLLMEngine` (GPUs; vllm is optional). `make_engine`
imports only the one chosen, so this module loads neither torch nor vllm; the engines import
their request and result types from `engine_types`, never this module.
"""

from __future__ import annotations

from typing import Any, Protocol

from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest, GenResult


class Engine(Protocol):
    """A base model and its adapters; `models` maps each served name to its adapter (None: the base)."""

    models: dict[str, str | None]
    tokenizer: Any
    max_len: int  # the model's context length, in tokens

    def encode(self, text: str) -> list[int]:
        """A prompt's token ids, encoded as lm-eval encodes it."""
        ...

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Completions, in the order asked; requests may name different models."""
        ...

    def choice_logliks(self, reqs: list[ChoiceRequest]) -> list[list[float]]:
        """log P(choice | prompt) for every choice of every request, as the scoring job computes it."""
        ...

    def choice_tokens(self, prompt: str, choices: list[str]) -> int:
        """Tokens in the longest prompt + choice input, for the prompt-length limit."""
        ...


def make_engine(
    backend: str, base: str, models: dict[str, str | None], batch_size: int = 8, options: dict | None = None
) -> Engine:
    """The HF engine, or the vLLM engine (each imported only when chosen)."""
    if backend == "vllm":
        from muscle_ray.serving.vllm_engine import VLLMEngine

        return VLLMEngine(base, models, **(options or {}))
    from muscle_ray.serving.hf_engine import HFEngine

    return HFEngine(base, models, batch_size=batch_size, **(options or {}))
