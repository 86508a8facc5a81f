"""Pretraining a small base from scratch on the world's corpus: next-token CE on packed text."""

from __future__ import annotations

import math
import time

import torch


def pack(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long token stream, documents separated by EOS, as LLM pretraining packs text."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pretrain(
    model,
    stream: torch.Tensor,
    steps: int,
    seed: int,
    batch_size: int = 32,
    seq_len: int = 64,
    lr: float = 3e-3,
    warmup: int = 50,
    log_every: int = 100,
    log=print,
    schedule: str = "cosine",
    progress=None,
):
    """Random windows of the stream; AdamW with warmup, then a cosine-decayed (or constant) LR.

    Cosine is the default: snapshots of a constant-LR run never anneal, and their task accuracy
    jumps around by 20 points between neighbouring steps.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', not {schedule!r}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([stream[s : s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress(step + 1, steps)
        if log and (step + 1) % log_every == 0:
            log(f"  pretrain step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    return model.eval()
