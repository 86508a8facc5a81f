"""Tokenising requests exactly as lm-evaluation-harness's HFLM does, shared by every backend.

Matching lm-eval token for token is what makes per-instance log-likelihoods comparable with
published numbers: trailing context spaces move to the continuation, the continuation's tokens
are what is left of `encode(context + continuation)` after `len(encode(context))` tokens, an
empty context is replaced by the BOS (or EOS) token, and too-long inputs lose tokens on the left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from muscle_ray.chat import render_prompt
from muscle_ray.errors import BadRow
from muscle_ray.tasks.base import Instance

DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1_000_000_000


def max_length(config, tokenizer) -> int:
    """The model's context length, looked up in lm-eval's order (config, tokenizer, 2048)."""
    for cfg in (getattr(config, "text_config", None), config):
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if value:
                return int(value)
    tml = getattr(tokenizer, "model_max_length", None)
    if tml and tml < _TOKENIZER_INFINITY:
        return int(tml)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    """lm-eval's `tok_encode`: tokenizer defaults, but no second BOS when the text starts with one."""
    bos = tokenizer.decode(prefix_token_id(tokenizer))
    kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    return tokenizer.encode(text, **kwargs)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's `loglikelihood` builds them."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


def chat_instance(tokenizer, inst: Instance) -> Instance:
    """The instance as a chat model reads it (`chat_template: true`), as lm-eval's
    `--apply_chat_template` renders it: each context (or the conversation) is the user's turn
    ending in the generation prompt, and each continuation loses its target delimiter. The
    rendered text is then encoded like any other (a BOS the template wrote is not doubled)."""
    if inst.kind == "gen":
        return replace(inst, contexts=[render_prompt(tokenizer, inst.messages or inst.contexts[0])])
    cut = len(inst.delimiter)
    return replace(
        inst,
        contexts=[render_prompt(tokenizer, c) for c in inst.contexts],
        continuations=[c[cut:] if c.startswith(inst.delimiter) else c for c in inst.continuations],
    )


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A served prompt's token ids: lm-eval's encoding, and the BOS (or EOS) token for an empty one."""
    return encode(tokenizer, text) or [prefix_token_id(tokenizer)]


def longest_choice_input(tokenizer, context: str, choices: list[str]) -> int:
    """Tokens in the longest (context + choice) input of a multiple-choice question."""
    return max(sum(map(len, encode_pair(tokenizer, context, c))) for c in choices)


@dataclass
class PackedQuestion:
    """All options of one MC question in ONE sequence: the shared prefix once, then each branch.

    Branch i holds option i's model input after the shared prefix. Every branch token attends to
    the prefix and to earlier tokens of its own branch, and its position ids continue from the
    prefix, so each option sees exactly the sequence lm-eval feeds for it, while the context is
    computed once instead of once per option.
    """

    tokens: list[int]
    positions: list[int]
    branch: list[int]  # 0 = shared prefix, i + 1 = option i
    targets: list[list[int]]  # option i's continuation tokens
    score_at: list[list[int]]  # indices into `tokens` whose logits predict `targets[i]`

    def __len__(self) -> int:
        return len(self.tokens)


def check_fits(continuation: list[int], max_len: int, option: int) -> None:
    """Every continuation token must be predicted inside the model's context (lm-eval asserts
    this); a longer one is a bad row, not a crash of the batch it came in."""
    if len(continuation) > max_len:
        raise BadRow(
            f"option {option}'s continuation is {len(continuation)} tokens, longer than the "
            f"model's context of {max_len}"
        )


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for j in range(n):
        t = seqs[0][j]
        if any(s[j] != t for s in seqs[1:]):
            return j
    return n


def pack_question(tokenizer, inst: Instance, max_len: int) -> PackedQuestion:
    """Tokenise every (context, option) pair lm-eval's way and share their common token prefix.

    Works for one shared context (the usual case: prefix = the context) and for one context per
    option (WinoGrande: prefix = whatever leading tokens the contexts have in common).
    """
    inputs, targets = [], []
    for i, cont_text in enumerate(inst.continuations):
        ctx, cont = encode_pair(tokenizer, inst.context_for(i), cont_text)
        check_fits(cont, max_len, i)
        full = (ctx + cont)[-(max_len + 1) :]  # lm-eval's left truncation
        inputs.append(full[:-1])
        targets.append(cont)
    p = _common_prefix(inputs)
    tokens, positions, branch = list(inputs[0][:p]), list(range(p)), [0] * p
    score_at = []
    for i, inp in enumerate(inputs):
        offset = len(tokens)
        tokens += inp[p:]
        positions += range(p, len(inp))
        branch += [i + 1] * (len(inp) - p)
        first = len(inp) - len(targets[i])
        score_at.append([j if j < p else offset + j - p for j in range(first, len(inp))])
    return PackedQuestion(tokens, positions, branch, targets, score_at)


def prompt_tokens(tokenizer, text: str, max_len: int) -> list[int]:
    """A generation prompt, left-truncated to leave `max_len` tokens of room (lm-eval's rule)."""
    return encode(tokenizer, text)[-max_len:]


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Keep the text before the first stop string, the stop itself left out (lm-eval's
    post-processing, and OpenAI's and vLLM's `stop`). Every backend cuts here, once."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


def with_eos(tokenizer, stops: list[str]) -> list[str]:
    """The stop strings plus the EOS token's text (generation ends there too)."""
    eos = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else None
    return stops + ([eos] if eos and eos not in stops else [])


def completion_text(tokenizer, ids: list[int], stops: list[str]) -> str:
    """Generated token ids as the text a task scores: decoded, cut before a stop string or EOS."""
    return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), with_eos(tokenizer, stops))


def generation_groups(instances) -> dict[tuple[tuple[str, ...], int], list[int]]:
    """Indices of instances sharing (stop strings, max_new_tokens): one generate call each."""
    groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
    for i, inst in enumerate(instances):
        groups.setdefault((tuple(inst.stop), inst.max_new_tokens), []).append(i)
    return groups
