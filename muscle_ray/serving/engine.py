"""One base model held once, several PEFT adapters on it, chosen per request.

The engine runs a batch of requests grouped by (model, decoding settings): for each group it
switches the adapter (`set_adapter`, or `disable_adapter` for the base alone) and decodes with
the scoring job's own code (`scoring.hf.generate_tokens`, `HFScorer.loglikelihoods`), so a
greedy completion is the text `muscle score` generates for that prompt and a multiple-choice
pick is the one it scores. Per-token log-probabilities come from one teacher-forced pass over
prompt + completion, which also gives the prompt's log-probabilities for `echo`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from muscle_ray.models import ModelVersion
from muscle_ray.scoring.encode import cut_at_stop, encode, prefix_token_id
from muscle_ray.scoring.hf import HFScorer, generate_tokens, length_sorted_batches, with_eos
from muscle_ray.tasks.base import Instance


@dataclass(frozen=True)
class GenRequest:
    """One prompt to complete, already tokenised (lm-eval's encoding)."""

    model: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    logprobs: int | None = None      # None: no log-probabilities; k: the top k alternatives too
    echo: bool = False

    def decoding(self) -> tuple:
        return (self.model, self.stop, self.max_tokens, self.temperature, self.top_p)


@dataclass
class GenResult:
    text: str                  # the completion (the prompt first when echo)
    finish_reason: str         # "stop" (stop string or EOS) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: dict | None      # OpenAI's {tokens, token_logprobs, top_logprobs, text_offset}


@dataclass(frozen=True)
class ChoiceRequest:
    """A multiple-choice question: log P(choice | prompt) for each choice."""

    model: str
    prompt: str
    choices: tuple[str, ...]


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


def logprobs_object(tokenizer, ids: list[int], lps: list[float | None], tops: list[dict | None] | None,
                    offset: int = 0) -> dict:
    """OpenAI's logprobs block: token strings, their log-probs, top alternatives, char offsets."""
    tokens, offsets = [], []
    for i in range(len(ids)):
        offsets.append(offset + len(tokenizer.decode(ids[:i], skip_special_tokens=True)))
        tokens.append(token_text(tokenizer, ids[i]))
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def finish(tokenizer, gen: list[int], stops: list[str], max_new: int) -> tuple[str, int, str]:
    """(text, tokens kept, finish_reason): decoded and cut at stop strings as the scoring job does."""
    full = tokenizer.decode(gen, skip_special_tokens=True)
    text = cut_at_stop(full, stops)
    stopped = text != full or len(gen) < max_new or (gen and gen[-1] == tokenizer.eos_token_id)
    return text, covering_tokens(tokenizer, gen, text), "stop" if stopped else "length"


class HFEngine:
    """A base (+ adapters) in one process; not thread-safe by itself, so a lock guards the model."""

    def __init__(self, base: str, models: dict[str, str | None], batch_size: int = 8,
                 device: str | None = None):
        adapters = {n: a for n, a in models.items() if a}
        first = next(iter(adapters), None)
        self.scorer = HFScorer(ModelVersion(base, adapter=adapters.get(first), name=first or "base"),
                               batch_size=batch_size, device=device)
        self.model, self.tokenizer, self.max_len = self.scorer.model, self.scorer.tokenizer, self.scorer.max_len
        self.batch_size = self.scorer.batch_size
        # model name -> PEFT adapter name: "default" (from_pretrained's) for the first, then
        # a1, a2, ... (model names may hold '.', which PEFT's module keys cannot)
        self._peft = {}
        for j, (name, path) in enumerate(adapters.items()):
            if name != first:
                self.model.load_adapter(path, adapter_name=f"a{j}")
            self._peft[name] = "default" if name == first else f"a{j}"
        self.models = dict(models)
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """lm-eval's encoding; an empty prompt becomes the BOS (or EOS) token."""
        return encode(self.tokenizer, text) or [prefix_token_id(self.tokenizer)]

    @contextmanager
    def using(self, model: str):
        """The model's adapter active (or every adapter off for the base alone), one caller at a time."""
        with self._lock:
            if model in self._peft:
                self.model.set_adapter(self._peft[model])
                yield
            else:
                with self.model.disable_adapter() if self._peft else nullcontext():
                    yield

    # -- completions -------------------------------------------------------------------------
    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.decoding(), []).append(i)
        for (model, stop, max_new, temperature, top_p), idx in groups.items():
            stops = with_eos(self.tokenizer, list(stop))
            sampling = None if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                      "top_p": top_p, "top_k": 0}
            with self.using(model):
                for batch in length_sorted_batches([len(reqs[i].prompt_ids) for i in idx], self.batch_size):
                    self._generate_batch([reqs[idx[j]] for j in batch], stops, sampling,
                                         [idx[j] for j in batch], out)
        return out  # type: ignore[return-value]

    def _generate_batch(self, reqs: list[GenRequest], stops: list[str], sampling: dict | None,
                        where: list[int], out: list) -> None:
        """One generate call; log-probs of generated tokens come from its own logits, and a
        teacher-forced pass runs only for `echo` (the prompt's log-probs)."""
        tok, max_new = self.tokenizer, reqs[0].max_tokens
        prompts = [list(r.prompt_ids) for r in reqs]
        raw, logits = [[] for _ in reqs], None
        if max_new > 0:
            if any(r.logprobs is not None and not r.echo for r in reqs):
                raw, logits = generate_tokens(self.model, tok, prompts, stops, max_new, sampling, return_logits=True)
            else:
                raw = generate_tokens(self.model, tok, prompts, stops, max_new, sampling)
        echo = []
        for b, (r, seq, i) in enumerate(zip(reqs, raw, where)):
            gen = [t for t in seq if t != tok.pad_token_id] if tok.pad_token_id != tok.eos_token_id else seq
            text, _, reason = finish(tok, gen, stops, max_new)
            k = covering_tokens(tok, seq, text)
            out[i] = GenResult(text, reason, len(r.prompt_ids), len(gen), None)
            if r.echo:
                echo.append((r, seq[:k], out[i]))
            elif r.logprobs is not None:
                rows = torch.log_softmax(logits[b, :k], dim=-1)
                lps, tops = self._entries(rows, seq[:k], r.logprobs)
                offset = len(tok.decode(prompts[b], skip_special_tokens=True))
                out[i].logprobs = logprobs_object(tok, seq[:k], lps, tops, offset)
        if echo:
            self._echo([e[0] for e in echo], [e[1] for e in echo], [e[2] for e in echo])

    def _entries(self, rows: torch.Tensor, tokens: list[int], top: int | None):
        """(log-probs of `tokens`, top alternatives) from the log-softmax rows that predict them."""
        lps = rows.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
        if not top:
            return lps, [{} for _ in tokens] if top == 0 else None
        v, t = rows.topk(top, dim=-1)
        return lps, [{token_text(self.tokenizer, int(x)): float(y) for x, y in zip(ts, vs)} for ts, vs in zip(t, v)]

    @torch.no_grad()
    def _echo(self, reqs: list[GenRequest], gens: list[list[int]], results: list[GenResult]) -> None:
        """Prompt + completion returned, with log P(token | everything before it) from one
        teacher-forced pass (the first token has none, as in OpenAI's echo)."""
        seqs = [list(r.prompt_ids) + g for r, g in zip(reqs, gens)]
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(seqs):   # right padding: positions need no shift
            ids[b, :len(s)], attn[b, :len(s)] = torch.tensor(s), 1
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        lp_all = torch.log_softmax(logits.float(), dim=-1).cpu()
        for b, (r, s, res) in enumerate(zip(reqs, seqs, results)):
            res.text = self.tokenizer.decode(list(r.prompt_ids), skip_special_tokens=True) + res.text
            if r.logprobs is None:
                continue
            lps, tops = self._entries(lp_all[b, :len(s) - 1], s[1:], r.logprobs)
            res.logprobs = logprobs_object(self.tokenizer, s, [None] + lps, None if tops is None else [None] + tops)

    # -- multiple choice ---------------------------------------------------------------------
    def choice_logliks(self, reqs: list[ChoiceRequest]) -> list[list[float]]:
        """log P(choice | prompt) per choice, with the scoring job's packed forward pass."""
        out: list[list[float] | None] = [None] * len(reqs)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.model, []).append(i)
        for model, idx in groups.items():
            insts = [Instance(id=str(i), task="serve", kind="mc", contexts=[reqs[i].prompt],
                              continuations=list(reqs[i].choices), choice_chars=[len(c) for c in reqs[i].choices])
                     for i in idx]
            with self.using(model):
                for i, o in zip(idx, self.scorer.loglikelihoods(insts)):
                    out[i] = o.logliks
        return out  # type: ignore[return-value]

    def choice_tokens(self, prompt: str, choices: list[str]) -> int:
        """Length of the longest (prompt + choice) input, for the prompt-length limit."""
        from muscle_ray.scoring.encode import encode_pair

        return max(sum(map(len, encode_pair(self.tokenizer, prompt, c))) for c in choices)


def make_engine(backend: str, base: str, models: dict[str, str | None], batch_size: int = 8,
                options: dict | None = None):
    """The HF engine, or the vLLM engine (imported only when chosen)."""
    if backend == "vllm":
        from muscle_ray.serving.vllm_engine import VLLMEngine

        return VLLMEngine(base, models, **(options or {}))
    return HFEngine(base, models, batch_size=batch_size, **(options or {}))
