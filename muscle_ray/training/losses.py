"""The MUSCLE compatibility loss (paper Eq. 1) and its masking ablations (Table 7).

Per token i with next-token label y_i the loss distils the student from ONE teacher, picked
by a mask m_i (1 = old model v1, 0 = new task model v2):

    loss = (1 - w) * mean_i [ m_i * KL(p_old,i || p_s,i) + (1 - m_i) * KL(p_new,i || p_s,i) ]
           + w * mean_i CE(y_i, p_s,i)

with p = softmax(logits / T), the KL summed over the vocabulary and the mean taken over the
tokens whose label != ignore_index.

Choices the paper leaves open (spec §9), made here and kept as options:
- No T² factor by default (`t2_scaling=False`): the paper does not state one (§9.2) and with
  T = 2 it would quadruple the KL against the CE term. `t2_scaling=True` multiplies the KL by T².
- Masks are computed at temperature 1 from the models' own probabilities (σ(z) in the paper);
  argmax does not depend on T anyway. They carry no gradient.
- `sequence_likelihood`: a sequence goes to the old teacher when the student's SUM of label
  log-probabilities over the sequence's valid tokens is below the old model's (the product of
  the per-token probabilities, spec §3.4 [?]).
- Stats: `share_old` = share of valid tokens sent to the old teacher; `kl_old` / `kl_new` = each
  KL averaged over ALL valid tokens (whichever teacher the mask picked, so they are comparable
  across steps and masks); `kl_old_masked` = KL to old averaged over the tokens sent to it;
  `ce` = cross-entropy at T = 1 over all valid tokens.

Memory: logits of (tokens × vocab) are processed `chunk_tokens` rows at a time, each chunk under
activation checkpointing, so float32 log-softmax intermediates exist for one chunk only (the
student's logits themselves are the model's output and are not copied).

Top-k teachers (`TopK`): a teacher given as its k most likely ids at temperature T, their
log-probabilities and the log of the remaining ("tail") mass. The student is then renormalised
on the same k + 1 buckets (its own probabilities of those ids, and the rest summed), so both
sides are distributions over one support. By the data-processing inequality this KL is a lower
bound of the full one, equal when the tail is empty. Masks need the old model's argmax (= the
top-1 id) and its label probability at T = 1: `label_logprob` when the producer knew the labels
(the cache and the co-located actor do), otherwise the stored log-prob at the label if it is in
the top-k and the tail mass (an upper bound of the label's probability) if it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from muscle_ray.errors import MuscleError

Mask = Literal["muscle", "old_correct", "old", "new", "token_likelihood", "sequence_likelihood"]
MASKS: tuple[str, ...] = get_args(Mask)
# Finite stand-in for log 0: e^-100 is below float32's smallest denormal, so clamping there
# changes no representable probability and keeps 0 · log 0 terms at 0 instead of nan.
_FLOOR = -100.0


@dataclass
class TopK:
    """A teacher's distribution kept as top-k ids + log-probs at temperature T + log tail mass."""

    ids: torch.Tensor  # (batch, seq, k) long, most likely first
    logprobs: torch.Tensor  # (batch, seq, k) float, log softmax(z / T) at ids
    tail_logmass: torch.Tensor  # (batch, seq) float, log(1 - sum exp(logprobs))
    label_logprob: torch.Tensor | None = None  # (batch, seq) log softmax(z)[label] at T = 1

    def detach(self) -> "TopK":
        lp = None if self.label_logprob is None else self.label_logprob.detach()
        return TopK(self.ids.detach(), self.logprobs.detach(), self.tail_logmass.detach(), lp)


def topk_from_logits(logits: torch.Tensor, k: int, temperature: float, labels: torch.Tensor | None = None) -> TopK:
    """Compress full teacher logits into the top-k form (used by the cache and the actor)."""
    with torch.no_grad():
        lp = F.log_softmax(logits.float() / temperature, dim=-1)
        vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        covered = torch.logsumexp(vals, dim=-1).clamp(max=0.0)
        tail = torch.log(-torch.expm1(covered)).clamp(min=_FLOOR)  # log(1 - covered mass)
        label_lp = None
        if labels is not None:
            lp1 = F.log_softmax(logits.float(), dim=-1)
            label_lp = lp1.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return TopK(ids, vals, tail, label_lp)


def _flat(x, idx):
    """Rows `idx` of a (batch, seq, ...) tensor or TopK, flattened over (batch, seq)."""
    if isinstance(x, TopK):
        lab = None if x.label_logprob is None else _flat(x.label_logprob, idx)
        return TopK(_flat(x.ids, idx), _flat(x.logprobs, idx), _flat(x.tail_logmass, idx), lab)
    return x.reshape(-1, *x.shape[2:])[idx]


def _rows(x, rows):
    """Rows of an already flattened tensor or TopK."""
    if isinstance(x, TopK):
        lab = None if x.label_logprob is None else x.label_logprob[rows]
        return TopK(x.ids[rows], x.logprobs[rows], x.tail_logmass[rows], lab)
    return x[rows]


def _flat_view(x):
    """(batch * seq, ...) view of a tensor or TopK, for row indexing (no copy)."""
    if isinstance(x, TopK):
        lab = None if x.label_logprob is None else x.label_logprob.reshape(-1)
        return TopK(
            x.ids.reshape(-1, x.ids.shape[-1]),
            x.logprobs.reshape(-1, x.logprobs.shape[-1]),
            x.tail_logmass.reshape(-1),
            lab,
        )
    return x.reshape(-1, *x.shape[2:])


def _argmax_and_label_logprob(teacher, labels):
    """(argmax id, log p(label) at T = 1) per row, without gradient."""
    if isinstance(teacher, TopK):
        top1 = teacher.ids.gather(-1, teacher.logprobs.argmax(-1, keepdim=True)).squeeze(-1)
        if teacher.label_logprob is not None:
            return top1, teacher.label_logprob.float()
        hit = teacher.ids == labels.unsqueeze(-1)
        in_top = (teacher.logprobs.float() * hit).sum(-1)
        return top1, torch.where(hit.any(-1), in_top, teacher.tail_logmass.float())
    z = teacher.float()
    return z.argmax(-1), z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)


def _kl_to_student(teacher, s_lp_T, s_logits_T):
    """Per-row KL(teacher || student) at temperature T; the student's log-probs are given."""
    if isinstance(teacher, TopK):
        ids = teacher.ids
        s_top = s_lp_T.gather(-1, ids)
        # Student tail = its mass outside the teacher's ids, computed stably from the logits.
        rest = s_logits_T.scatter(-1, ids, float("-inf"))
        s_tail = torch.logsumexp(rest, -1) - torch.logsumexp(s_logits_T, -1)
        t = torch.cat([teacher.logprobs.float(), teacher.tail_logmass.float().unsqueeze(-1)], -1)
        s = torch.cat([s_top, s_tail.unsqueeze(-1)], -1)
    else:
        t, s = teacher, s_lp_T
    t, s = t.clamp(min=_FLOOR), s.clamp(min=_FLOOR)
    return (t.exp() * (t - s)).sum(-1)


def _temper(teacher, temperature):
    if isinstance(teacher, TopK):
        return teacher
    return F.log_softmax(teacher.float() / temperature, -1)


def _chunk_terms(flat_student, old, new, rows, labels, temperature):
    """(KL to old, KL to new, CE) per row of one chunk; run under checkpoint.

    The chunk is sliced here, inside the checkpoint, so what autograd keeps for backward is
    the row index and references to tensors that already exist, not per-chunk copies."""
    s_logits, old, new = flat_student[rows], _rows(old, rows), _rows(new, rows)
    s_T = s_logits.float() / temperature
    s_lp_T = F.log_softmax(s_T, -1)
    kl_old = _kl_to_student(_temper(old, temperature), s_lp_T, s_T)
    kl_new = _kl_to_student(_temper(new, temperature), s_lp_T, s_T)
    ce = F.cross_entropy(s_logits.float(), labels, reduction="none")
    return kl_old, kl_new, ce


def _compute_mask(mask, s_argmax, s_label_lp, o_argmax, o_label_lp, labels, seq_of_row, n_seq):
    if mask == "muscle":
        return s_argmax != labels
    if mask == "old_correct":
        return o_argmax == labels
    if mask == "old":
        return torch.ones_like(labels, dtype=torch.bool)
    if mask == "new":
        return torch.zeros_like(labels, dtype=torch.bool)
    if mask == "token_likelihood":
        return s_label_lp < o_label_lp
    # sequence_likelihood: one decision per sequence, from summed label log-probs.
    s_seq = torch.zeros(n_seq, dtype=torch.float32, device=labels.device).index_add_(0, seq_of_row, s_label_lp)
    o_seq = torch.zeros(n_seq, dtype=torch.float32, device=labels.device).index_add_(0, seq_of_row, o_label_lp)
    return (s_seq < o_seq)[seq_of_row]


def compat_loss(
    student_logits,
    old_logits,
    new_logits,
    labels,
    mask: str = "muscle",
    temperature: float = 2.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    return_stats: bool = False,
    t2_scaling: bool = False,
    chunk_tokens: int = 1024,
):
    """MUSCLE loss. Logits (batch, seq, vocab) or `TopK` for the teachers; labels (batch, seq)
    already shifted (label[i] is the token after position i). See the module docstring."""
    if mask not in MASKS:
        raise MuscleError(f"unknown mask '{mask}'; choose one of {', '.join(MASKS)}")
    if not 0.0 <= ce_weight <= 1.0:
        raise MuscleError(f"ce_weight must be in [0, 1], got {ce_weight}")
    # The teachers are frozen targets: whatever a caller passes, gradient reaches the student only.
    old_logits, new_logits = old_logits.detach(), new_logits.detach()
    batch, seq = labels.shape
    flat_labels = labels.reshape(-1)
    idx = (flat_labels != ignore_index).nonzero().squeeze(-1)
    n = idx.numel()
    if n == 0:
        zero = student_logits.sum() * 0.0
        stats = dict(share_old=0.0, kl_old=0.0, kl_new=0.0, kl_old_masked=0.0, ce=0.0, tokens=0)
        return (zero, stats) if return_stats else zero
    y = flat_labels[idx]
    seq_of_row = idx // seq
    flat_student = student_logits.reshape(batch * seq, -1)

    # Pass 1 (no grad): the per-token quantities the masks need, chunk by chunk.
    with torch.no_grad():
        parts = []
        for start in range(0, n, chunk_tokens):
            rows = idx[start : start + chunk_tokens]
            yy = y[start : start + chunk_tokens]
            s_arg, s_lab = _argmax_and_label_logprob(flat_student[rows].detach(), yy)
            o_arg, o_lab = _argmax_and_label_logprob(_flat(old_logits, rows), yy)
            parts.append((s_arg, s_lab, o_arg, o_lab))
        s_arg, s_lab, o_arg, o_lab = (torch.cat(p) for p in zip(*parts))
        m = _compute_mask(mask, s_arg, s_lab, o_arg, o_lab, y, seq_of_row, batch).float()

    # Pass 2 (with grad): KL / CE per chunk, each chunk recomputed in backward.
    kl_sum = torch.zeros((), device=student_logits.device)
    ce_sum = torch.zeros((), device=student_logits.device)
    kl_old_all, kl_new_all = [], []
    for start in range(0, n, chunk_tokens):
        rows = idx[start : start + chunk_tokens]
        mm = m[start : start + chunk_tokens]
        k_old, k_new, ce = checkpoint(
            _chunk_terms,
            flat_student,
            _flat_view(old_logits),
            _flat_view(new_logits),
            rows,
            y[start : start + chunk_tokens],
            temperature,
            use_reentrant=False,
        )
        kl_sum = kl_sum + (mm * k_old + (1 - mm) * k_new).sum()
        ce_sum = ce_sum + ce.sum()
        kl_old_all.append(k_old.detach())
        kl_new_all.append(k_new.detach())
    kl = kl_sum / n * (temperature**2 if t2_scaling else 1.0)
    ce = ce_sum / n
    loss = (1.0 - ce_weight) * kl + ce_weight * ce if ce_weight > 0 else kl
    if not return_stats:
        return loss
    k_old, k_new = torch.cat(kl_old_all), torch.cat(kl_new_all)
    n_old = m.sum()
    stats = dict(
        share_old=float(n_old / n),
        kl_old=float(k_old.mean()),
        kl_new=float(k_new.mean()),
        kl_old_masked=float((k_old * m).sum() / n_old) if n_old > 0 else 0.0,
        ce=float(ce.detach()),
        tokens=int(n),
    )
    return loss, stats


def ce_loss(student_logits, labels, ignore_index: int = -100, return_stats: bool = False):
    """Plain next-token cross-entropy (task adapters, and the compat job's `mask: ce` control)."""
    flat = student_logits.reshape(-1, student_logits.shape[-1]).float()
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index)
    if not return_stats:
        return loss
    return loss, dict(ce=float(loss.detach()), tokens=int((labels != ignore_index).sum()))
