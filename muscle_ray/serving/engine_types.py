"""The requests a serving engine takes and the results it gives (see `engine.Engine`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenRequest:
    """One prompt to complete, already tokenised (lm-eval's encoding)."""

    model: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    logprobs: int | None = None  # None: no log-probabilities; k: the top k alternatives too
    echo: bool = False
    seed: int | None = None  # sampling: the generator is seeded with it before the batch runs

    def decoding(self) -> tuple:
        """Requests with equal decoding settings run as one batch."""
        return (self.model, self.stop, self.max_tokens, self.temperature, self.top_p, self.seed)


@dataclass
class GenResult:
    text: str  # the completion, cut before the first stop string (the prompt first when echo)
    finish_reason: str  # "stop" (stop string or EOS) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: dict | None  # OpenAI's {tokens, token_logprobs, top_logprobs, text_offset}


@dataclass(frozen=True)
class ChoiceRequest:
    """A multiple-choice question: log P(choice | prompt) for each choice."""

    model: str
    prompt: str
    choices: tuple[str, ...]
