"""The default backend: Hugging Face transformers on CPU or GPU.

Multiple choice runs each question as ONE packed sequence (shared context once, then every
option as its own branch, see `encode.PackedQuestion`), several questions per forward pass in
length-sorted batches. Generation is batched greedy decoding with left padding, a token limit,
and stop strings checked per sequence on the generated text only (as lm-eval does).

Packing passes a custom 4D attention mask and explicit position ids, which transformers'
"sdpa" and "eager" attention (the defaults) honour; flash-attention-2 would ignore the mask.

`backend_options` (config.HFOptions) reach `HFScorer` as keyword arguments: `dtype`,
`device_map` (the model is placed by accelerate, inputs go to its first parameter's device)
and `attn_implementation`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from muscle_ray.chat import require_chat_template
from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion, load_model, load_tokenizer
from muscle_ray.scoring.encode import (
    PackedQuestion,
    chat_instance,
    completion_text,
    generation_groups,
    max_length,
    pack_question,
    prompt_tokens,
    with_eos,
)
from muscle_ray.scoring.outputs import GenOutput, MCOutput
from muscle_ray.tasks.base import Instance


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped longest first, so each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def branch_attention_mask(branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [B, 1, L, L]: causal, and a branch sees only the prefix and itself.

    Padding (branch -1) sits after every real token, so causality already hides it.
    """
    L = branch.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=branch.device).tril()
    keys, queries = branch[:, None, :], branch[:, :, None]
    allowed = causal & ((keys == 0) | (keys == queries))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=branch.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class _StopStrings:
    """Per-sequence stop: done once the generated part (not the prompt) contains a stop string."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class HFScorer:
    """Holds one model version; scores Instances in batches of `batch_size` questions/prompts.
    With `chat_template`, every instance is read through the model's chat template first.
    `dtype`, `device_map` and `attn_implementation` are `backend_options` (see `models.load_model`)."""

    def __init__(
        self,
        version: ModelVersion,
        batch_size: int = 8,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        chat_template: bool = False,
        device_map: str | dict | None = None,
        attn_implementation: str | None = None,
    ):
        self.version = version
        self.batch_size = max(1, int(batch_size))
        self.tokenizer = load_tokenizer(version)
        self.chat_template = chat_template
        if chat_template:
            require_chat_template(self.tokenizer)
        self.model = load_model(version, device, dtype, device_map=device_map, attn_implementation=attn_implementation)
        self._placed = device_map is not None  # accelerate placed it: never move it as a whole
        self.device = next(self.model.parameters()).device
        self.max_len = max_length(self.model.config, self.tokenizer)
        # model name -> PEFT adapter name ("default" is from_pretrained's; model names may hold
        # '.', which PEFT's module keys cannot, so later ones are a1, a2, ...)
        self._adapters = {version.name: "default"} if version.adapter else {}

    # -- adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        """Load another PEFT adapter on the same base, unmerged; `use_adapter(name)` picks it."""
        from peft import PeftModel

        key = f"a{len(self._adapters)}"
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=key)
        else:
            model = PeftModel.from_pretrained(self.model, path, adapter_name=key)
            self.model = (model if self._placed else model.to(self.device)).eval()
        self._adapters[name] = key

    @contextmanager
    def use_adapter(self, name: str | None):
        """Score with adapter `name` active, or with every adapter off for None (the base alone).
        Not thread-safe: one caller at a time (the serving engine holds a lock)."""
        if name is not None:
            self.model.set_adapter(self._adapters[name])
            yield
        else:
            with self.model.disable_adapter() if self._adapters else nullcontext():
                yield

    # -- multiple choice ---------------------------------------------------------------------
    def _as_read(self, instances: list[Instance]) -> list[Instance]:
        return [chat_instance(self.tokenizer, i) for i in instances] if self.chat_template else instances

    def loglikelihoods(self, instances: list[Instance]) -> list[MCOutput]:
        instances = self._as_read(instances)
        packed = [pack_question(self.tokenizer, inst, self.max_len) for inst in instances]
        out: list[MCOutput | None] = [None] * len(packed)
        for idx in length_sorted_batches([len(q) for q in packed], self.batch_size):
            for i, lls in zip(idx, self._forward([packed[i] for i in idx])):
                out[i] = MCOutput(lls, len(packed[i]))
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _forward(self, qs: list[PackedQuestion]) -> list[list[float]]:
        B, L = len(qs), max(len(q) for q in qs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        br = torch.full((B, L), -1, dtype=torch.long)
        for b, q in enumerate(qs):
            n = len(q)
            ids[b, :n], pos[b, :n] = torch.tensor(q.tokens), torch.tensor(q.positions)
            br[b, :n] = torch.tensor(q.branch)
        dtype = next(self.model.parameters()).dtype
        mask = branch_attention_mask(br.to(self.device), dtype)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos.to(self.device)).logits
        results = []
        for b, q in enumerate(qs):
            lls = []
            for at, target in zip(q.score_at, q.targets):
                lp = torch.log_softmax(logits[b, at].float(), dim=-1)
                lls.append(float(lp.gather(1, torch.tensor(target, device=lp.device)[:, None]).sum()))
            results.append(lls)
        return results

    # -- generation --------------------------------------------------------------------------
    def generate(self, instances: list[Instance]) -> list[GenOutput]:
        instances = self._as_read(instances)
        out: list[GenOutput | None] = [None] * len(instances)
        for (stops, max_new), members in generation_groups(instances).items():
            if not 0 < max_new < self.max_len:
                raise MuscleError(
                    f"task {instances[members[0]].task}: max_new_tokens {max_new} must be "
                    f"between 1 and the model's context length - 1 ({self.max_len - 1})"
                )
            prompts = [prompt_tokens(self.tokenizer, instances[i].contexts[0], self.max_len - max_new) for i in members]
            for idx in length_sorted_batches([len(p) for p in prompts], self.batch_size):
                texts = self._generate([prompts[j] for j in idx], list(stops), max_new)
                for j, (text, n) in zip(idx, texts):
                    out[members[j]] = GenOutput(text, n)
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], stops: list[str], max_new: int) -> list[tuple[str, int]]:
        gen = self.generate_tokens(prompts, with_eos(self.tokenizer, stops), max_new)
        return [(completion_text(self.tokenizer, g, stops), len(p) + len(g)) for p, g in zip(prompts, gen)]

    @torch.no_grad()
    def generate_tokens(
        self,
        prompts: list[list[int]],
        stops: list[str],
        max_new: int,
        sampling: dict | None = None,
        return_logits: bool = False,
    ):
        """New token ids per prompt: one left-padded batch, stop strings checked per sequence.

        Greedy unless `sampling` gives `generate` sampling kwargs (do_sample, temperature, top_p).
        Shared by the scoring job and the serving engine, so both produce the same greedy text.
        Padding added after a sequence stopped is dropped (when pad differs from EOS).
        With `return_logits`: (ids per prompt with nothing dropped, so position j is step j,
        raw logits [B, steps, vocab]) -- per-token log-probs without a second forward pass.
        """
        from transformers import StoppingCriteriaList

        tok = self.tokenizer
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            ids[b, L - len(p) :], attn[b, L - len(p) :] = torch.tensor(p), 1
        decoding = sampling or {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            max_new_tokens=max_new,
            **decoding,
            stopping_criteria=StoppingCriteriaList([_StopStrings(tok, stops, L)]),
            pad_token_id=tok.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=return_logits,
        )
        gen = out.sequences[:, L:].tolist()
        if return_logits:
            return gen, torch.stack(out.logits, dim=1).float().cpu()
        if tok.pad_token_id == tok.eos_token_id:
            return gen
        return [[t for t in g if t != tok.pad_token_id] for g in gen]

    @torch.no_grad()
    def log_probs(self, seqs: list[list[int]]) -> torch.Tensor:
        """log-softmax over the vocabulary at every position of each sequence, from one
        teacher-forced pass: [B, longest, vocab] on the CPU, right padded (row j predicts token j + 1)."""
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(seqs):  # right padding: positions need no shift
            ids[b, : len(s)], attn[b, : len(s)] = torch.tensor(s), 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu()
