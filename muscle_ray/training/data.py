"""Training text -> tokenized Ray Datasets the train workers read as shards.

Input: a JSONL or Parquet file whose rows have string fields `prompt` and `completion`, or a
chat conversation `messages` (`[{"role", "content"}, ...]`, the last message the assistant's
answer), or a task's file (`task: NAME`), turned into pairs by `Task.training_pair`. Rows are
read, checked (errors name the file and row) and tokenized on the driver; the train workers
read the resulting Ray Datasets as shards (`ray.train.get_dataset_shard`).

Prompt and completion are tokenised the way scoring tokenises a context and its continuation
(lm-eval's joint encoding, `scoring.encode.encode_pair`): a prompt's trailing spaces move to
the completion and the completion's tokens are those of the whole text after the prompt's, so
the tokens trained on at the seam are the tokens scored.

With `chat_template: true` the pair is rendered as scoring renders it for a chat model
(`muscle_ray.chat`): the prompt (or conversation) ends with the template's generation prompt,
the completion is the assistant's turn (the answer without its leading delimiter, then the
template's own end of turn, which replaces the EOS), and only that turn carries loss.

Each tokenized row is fixed-length (`max_length`, right-padded) with
  input_ids       prompt tokens + completion tokens + EOS
  attention_mask  1 on real tokens
  labels          the NEXT token of each position (already shifted), -100 where there is
                  none (padding, last token) and, with loss_on=completion, on prompt positions
Workers trim each batch to its longest row, so the padding costs no compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from muscle_ray.chat import plain_text, render_turn, split_messages
from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.scoring.encode import encode_pair
from muscle_ray.training.config import DataConfig

IGNORE = -100


def read_pairs(path: str, task: str | None = None, task_options: dict | None = None) -> list[dict]:
    """[{"prompt": text or conversation, "completion"}] from a JSONL/Parquet file or a task's file."""
    p = Path(path)
    if not p.exists():
        raise MuscleError(f"{path}: training data not found")
    if task:
        from muscle_ray.tasks import get_task

        t = get_task(task, **(task_options or {}))
        pairs = []
        for record in t.records(str(path)):
            try:
                prompt, completion = t.training_pair(t.parse(record))
            except BadRow as e:
                raise MuscleError(f"{path}: row {record.row}: {e.reason} (task {t.name})") from None
            pairs.append({"prompt": prompt, "completion": completion})
        return pairs
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    elif p.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MuscleError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
    else:
        raise MuscleError(
            f"{path}: training data must be .jsonl or .parquet (with prompt, completion fields or messages)"
        )
    if not rows:
        raise MuscleError(f"{path}: no rows")
    return [_pair(r, f"{path}: row {i}") for i, r in enumerate(rows, 1)]


def _pair(row: dict, where: str) -> dict:
    if isinstance(row, dict) and row.get("messages") is not None:
        try:
            prompt, answer = split_messages(row["messages"])
        except BadRow as e:
            raise MuscleError(f"{where}: {e.reason}") from None
        return {"prompt": prompt, "completion": answer}
    for field in ("prompt", "completion"):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise MuscleError(f"{where}: field '{field}' missing or not a string (or give 'messages')")
    return {"prompt": row["prompt"], "completion": row["completion"]}


def tokenize_pair(
    tokenizer, prompt: str | list[dict], completion: str, max_length: int, loss_on: str, chat_template: bool = False
) -> dict:
    if chat_template:
        prompt, completion = render_turn(tokenizer, prompt, completion.lstrip())
        loss_on, end = "completion", []  # the template's end of turn closes the answer
    else:
        prompt, end = plain_text(prompt), [tokenizer.eos_token_id]
    p_ids, c_ids = encode_pair(tokenizer, prompt, completion)
    c_ids = c_ids + end
    ids = (p_ids + c_ids)[:max_length]
    n = len(ids)
    input_ids = np.full(max_length, tokenizer.pad_token_id, dtype=np.int64)
    input_ids[:n] = ids
    mask = np.zeros(max_length, dtype=np.int64)
    mask[:n] = 1
    labels = np.full(max_length, IGNORE, dtype=np.int64)
    labels[: n - 1] = ids[1:]
    if loss_on == "completion":
        labels[: max(len(p_ids) - 1, 0)] = IGNORE
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def tokenize_pairs(pairs: list[dict], base: str, data: DataConfig) -> list[dict]:
    """Rows of fixed-length int64 arrays for a list of pairs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return [
        tokenize_pair(tok, r["prompt"], r["completion"], data.max_length, data.loss_on, data.chat_template)
        for r in pairs
    ]


def build_datasets(data: DataConfig, base: str):
    """(train, val) Ray Datasets of tokenized rows; val is the held-out tail when no val_path.

    Tokenizing happens once, here on the driver (a fast tokenizer does ~10^5 rows a second;
    starting Ray Data workers that import transformers costs more for adapter-sized data);
    the workers then read their shards of the resulting dataset every epoch."""
    import ray

    train_pairs = read_pairs(data.path, data.task, data.task_options)
    if data.val_path:
        val_pairs = read_pairs(data.val_path, data.task, data.task_options)
    else:
        n_val = int(round(len(train_pairs) * data.val_fraction))
        if n_val == 0 or n_val == len(train_pairs):
            val_pairs = train_pairs  # too small to hold out: validate on the training set
        else:
            train_pairs, val_pairs = train_pairs[:-n_val], train_pairs[-n_val:]
    return (
        ray.data.from_items(tokenize_pairs(train_pairs, base, data)),
        ray.data.from_items(tokenize_pairs(val_pairs, base, data)),
    )


def trim_batch(batch: dict, device=None) -> dict:
    """Torch tensors, cut to the longest real row (all (batch, seq, ...) columns alike)."""
    import torch

    mask = torch.as_tensor(batch["attention_mask"])
    length = int(mask.sum(1).max())
    out = {}
    for k, v in batch.items():
        t = torch.as_tensor(v)
        if t.dim() >= 2 and t.shape[1] == mask.shape[1]:
            t = t[:, :length]
        out[k] = t.to(device) if device is not None else t
    return out
