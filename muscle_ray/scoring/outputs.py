"""What a scoring backend returns per Instance (see `backend.Scorer`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MCOutput:
    logliks: list[float]  # summed log P(option's continuation | its context), per option
    n_tokens: int  # tokens run through the model for the question


@dataclass
class GenOutput:
    text: str  # the completion, cut before the first stop string (or EOS)
    n_tokens: int  # prompt + generated tokens
