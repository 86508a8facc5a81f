"""From generated token ids to an OpenAI completion: text, finish reason, logprobs block.

Both serving engines end here, so an HF and a vLLM deployment answer alike; the text is cut at
stop strings by `scoring.encode.completion_text`, the function the scoring job's backends use.
"""

from __future__ import annotations

from muscle_ray.scoring.encode import completion_text


def covering_tokens(tokenizer, ids: list[int], text: str) -> int:
    """How many leading tokens it takes to spell `text` (what is left after a stop cut)."""
    k = 0
    while k < len(ids) and len(tokenizer.decode(ids[:k], skip_special_tokens=True)) < len(text):
        k += 1
    return k


def token_text(tokenizer, token_id: int) -> str:
    """A token as text; a token that is only part of a UTF-8 character (it would decode to
    U+FFFD) is written `token_id:N`, as vLLM does, so alternatives never collide."""
    text = tokenizer.decode([token_id])
    return f"token_id:{token_id}" if "\ufffd" in text else text


def logprobs_object(
    tokenizer, ids: list[int], lps: list[float | None], tops: list[dict | None] | None, offset: int = 0
) -> dict:
    """OpenAI's logprobs block: token strings, their log-probs, top alternatives, char offsets."""
    tokens, offsets = [], []
    for i in range(len(ids)):
        offsets.append(offset + len(tokenizer.decode(ids[:i], skip_special_tokens=True)))
        tokens.append(token_text(tokenizer, ids[i]))
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def finish(tokenizer, gen: list[int], stops: list[str], max_new: int) -> tuple[str, int, str]:
    """(text, tokens kept, finish_reason) of generated ids: "stop" when a stop string or EOS
    ended them, "length" when the token limit did."""
    text = completion_text(tokenizer, gen, stops)
    stopped = (
        text != tokenizer.decode(gen, skip_special_tokens=True)
        or len(gen) < max_new
        or (bool(gen) and gen[-1] == tokenizer.eos_token_id)
    )
    return text, covering_tokens(tokenizer, gen, text), "stop" if stopped else "length"
