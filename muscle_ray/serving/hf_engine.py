"""The HF engine: one transformers base with its PEFT adapters, through the scoring job's scorer.

The engine runs a batch of requests grouped by (model, decoding settings): for each group it
activates the model's adapter (`HFScorer.use_adapter`) and decodes with the scoring job's own
code (`HFScorer.generate_tokens`, `HFScorer.loglikelihoods`), so a greedy completion is the
text `muscle score` generates for that prompt and a multiple-choice pick is the one it scores.
Per-token log-probabilities come from the generation's own logits; `echo` adds one
teacher-forced pass over prompt + completion for the prompt's log-probabilities.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from muscle_ray.models import ModelVersion
from muscle_ray.scoring.encode import encode_prompt, longest_choice_input, with_eos
from muscle_ray.scoring.hf import HFScorer, length_sorted_batches
from muscle_ray.serving.completion import covering_tokens, finish, logprobs_object, token_text
from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest, GenResult
from muscle_ray.tasks.base import Instance


class HFEngine:
    """A base (+ adapters) in one process; a lock keeps one batch on the model at a time."""

    def __init__(self, base: str, models: dict[str, str | None], batch_size: int = 8, device: str | None = None):
        self.models = dict(models)
        self.scorer = HFScorer(ModelVersion(base, name="base"), batch_size=batch_size, device=device)
        for name, adapter in models.items():
            if adapter:
                self.scorer.add_adapter(name, adapter)
        self.tokenizer, self.max_len = self.scorer.tokenizer, self.scorer.max_len
        self.batch_size = self.scorer.batch_size
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def choice_tokens(self, prompt: str, choices: list[str]) -> int:
        return longest_choice_input(self.tokenizer, prompt, choices)

    @contextmanager
    def using(self, model: str):
        """The model's adapter active (every adapter off for a base-only name), one caller at a time."""
        with self._lock, self.scorer.use_adapter(model if self.models.get(model) else None):
            yield

    # -- completions -------------------------------------------------------------------------
    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.decoding(), []).append(i)
        for (model, stop, max_new, temperature, top_p, seed), idx in groups.items():
            stops = with_eos(self.tokenizer, list(stop))
            sampling = (
                None
                if temperature == 0
                else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            )
            with self.using(model):
                for batch in length_sorted_batches([len(reqs[i].prompt_ids) for i in idx], self.batch_size):
                    if sampling and seed is not None:  # OpenAI's seed: best effort (the batch's other prompts count)
                        torch.manual_seed(seed)
                    self._generate_batch([reqs[idx[j]] for j in batch], stops, sampling, [idx[j] for j in batch], out)
        return out  # type: ignore[return-value]

    def _generate_batch(
        self, reqs: list[GenRequest], stops: list[str], sampling: dict | None, where: list[int], out: list
    ) -> None:
        """One generate call; log-probs of generated tokens come from its own logits, and a
        teacher-forced pass runs only for `echo` (the prompt's log-probs)."""
        tok, max_new = self.tokenizer, reqs[0].max_tokens
        prompts = [list(r.prompt_ids) for r in reqs]
        raw: list[list[int]] = [[] for _ in reqs]
        logits: torch.Tensor | None = None
        if max_new > 0:
            if any(r.logprobs is not None and not r.echo for r in reqs):
                raw, logits = self.scorer.generate_tokens(prompts, stops, max_new, sampling, return_logits=True)
            else:
                raw = self.scorer.generate_tokens(prompts, stops, max_new, sampling)
        echo = []
        for b, (r, seq, i) in enumerate(zip(reqs, raw, where)):
            gen = [t for t in seq if t != tok.pad_token_id] if tok.pad_token_id != tok.eos_token_id else seq
            text, _, reason = finish(tok, gen, stops, max_new)
            k = covering_tokens(tok, seq, text)
            out[i] = GenResult(text, reason, len(r.prompt_ids), len(gen), None)
            if r.echo:
                echo.append((r, seq[:k], out[i]))
            elif r.logprobs is not None and logits is not None:
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

    def _echo(self, reqs: list[GenRequest], gens: list[list[int]], results: list[GenResult]) -> None:
        """Prompt + completion returned, with log P(token | everything before it) from one
        teacher-forced pass (the first token has none, as in OpenAI's echo)."""
        seqs = [list(r.prompt_ids) + g for r, g in zip(reqs, gens)]
        lp_all = self.scorer.log_probs(seqs)
        for b, (r, s, res) in enumerate(zip(reqs, seqs, results)):
            res.text = self.tokenizer.decode(list(r.prompt_ids), skip_special_tokens=True) + res.text
            if r.logprobs is None:
                continue
            lps, tops = self._entries(lp_all[b, : len(s) - 1], s[1:], r.logprobs)
            res.logprobs = logprobs_object(self.tokenizer, s, [None] + lps, None if tops is None else [None] + tops)

    # -- multiple choice ---------------------------------------------------------------------
    def choice_logliks(self, reqs: list[ChoiceRequest]) -> list[list[float]]:
        """log P(choice | prompt) per choice, with the scoring job's packed forward pass."""
        out: list[list[float] | None] = [None] * len(reqs)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.model, []).append(i)
        for model, idx in groups.items():
            insts = [
                Instance(
                    id=str(i),
                    task="serve",
                    kind="mc",
                    contexts=[reqs[i].prompt],
                    continuations=list(reqs[i].choices),
                    choice_chars=[len(c) for c in reqs[i].choices],
                )
                for i in idx
            ]
            with self.using(model):
                for i, o in zip(idx, self.scorer.loglikelihoods(insts)):
                    out[i] = o.logliks
        return out  # type: ignore[return-value]
