"""Training text -> tokenized Ray Datasets the train workers read as shards.

Input: a JSONL or Parquet file whose rows have string fields `prompt` and `completion`, or a
chat conversation `messages` (`[{"role", "content"}, ...]`, the last message the assistant's
answer), or a task's file (`task: NAME`), turned into pairs by `Task.training_pair`. Rows are
checked as they are read (errors name the file and row); the train workers read the resulting
Ray Datasets as shards (`ray.train.get_dataset_shard`). Two ways to get there
(`DataConfig.stream`), giving the same rows in the same order:

  in memory  the driver reads, checks and tokenizes every pair and hands the rows to
             `ray.data.from_items`: no Ray Data task at all, which for adapter-sized data is
             the fastest (starting a worker that imports transformers costs more than
             tokenizing a few thousand rows), but the driver holds every row.
  streamed   a Ray task on the driver's node (the file is a local path) reads the file line
             by line / by record batches, tokenizes each pair and writes the token ids
             unpadded to Parquet chunks of CHUNK_ROWS rows in a scratch directory; the
             datasets are reads of those chunks by Ray Data tasks on that node, which pad each
             chunk to the fixed-length rows below. The driver gets only the row count, so its
             memory does not grow with the file (bench/bench_train_data_stream.py measures it).

`stream: auto` streams a training file over STREAM_THRESHOLD bytes: the demo's files, and any
that fit comfortably in memory, keep the in-memory path and its speed.

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
import tempfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from muscle_ray.chat import plain_text, render_turn, split_messages
from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.scoring.encode import encode_pair
from muscle_ray.training.config import DataConfig

IGNORE = -100
STREAM_THRESHOLD = 64 * 1024 * 1024  # bytes: `stream: auto` streams a training file larger than this
CHUNK_ROWS = 8192  # rows per tokenized chunk file, and per Ray Data block read from it


class Datasets(NamedTuple):
    train: Any  # ray.data.Dataset
    val: Any
    n_train: int
    n_val: int
    streamed: bool  # read from tokenized chunks by Ray Data tasks (else built on the driver)


# --- pairs ------------------------------------------------------------------------------------


def read_pairs(path: str, task: str | None = None, task_options: dict | None = None) -> list[dict]:
    """[{"prompt": text or conversation, "completion"}] from a JSONL/Parquet file or a task's file."""
    return list(iter_pairs(path, task, task_options))


def iter_pairs(path: str, task: str | None = None, task_options: dict | None = None) -> Iterator[dict]:
    """The pairs of `read_pairs` one at a time, read as they are consumed (a missing file, an
    unknown task or file type is refused at once)."""
    p = Path(path)
    if not p.exists():
        raise MuscleError(f"{path}: training data not found")
    if task:
        from muscle_ray.tasks import get_task

        return _task_pairs(path, get_task(task, **(task_options or {})))
    if p.suffix == ".parquet":
        return _checked(path, _parquet_rows(p))
    if p.suffix in (".jsonl", ".json"):
        return _checked(path, _jsonl_rows(path))
    raise MuscleError(f"{path}: training data must be .jsonl or .parquet (with prompt, completion fields or messages)")


def _task_pairs(path: str, t) -> Iterator[dict]:
    for record in t.records(str(path)):
        try:
            prompt, completion = t.training_pair(t.parse(record))
        except BadRow as e:
            raise MuscleError(f"{path}: row {record.row}: {e.reason} (task {t.name})") from None
        yield {"prompt": prompt, "completion": completion}


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed JSON) of each non-blank line."""
    i = 0
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield i, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise MuscleError(f"{path}: row {i}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise MuscleError(f"{path}: not valid UTF-8 after row {i} ({e.reason})") from None


def _parquet_rows(p: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=CHUNK_ROWS):
        for row in batch.to_pylist():
            i += 1
            yield i, row


def _checked(path: str, rows: Iterable[tuple[int, Any]]) -> Iterator[dict]:
    n = 0
    for n, (i, row) in enumerate(rows, 1):
        yield _pair(row, f"{path}: row {i}")
    if n == 0:
        raise MuscleError(f"{path}: no rows")


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


# --- tokens -----------------------------------------------------------------------------------


def _tokenizer(base: str):
    """The base's tokenizer as scoring loads it (`models.load_tokenizer`: pad = EOS when unset)."""
    from muscle_ray.models import ModelVersion, load_tokenizer

    return load_tokenizer(ModelVersion(base))


def pair_ids(
    tokenizer, prompt: str | list[dict], completion: str, max_length: int, loss_on: str, chat_template: bool = False
) -> tuple[list[int], int]:
    """A pair's token ids (cut to max_length) and how many leading label positions carry no loss."""
    if chat_template:
        prompt, completion = render_turn(tokenizer, prompt, completion.lstrip())
        loss_on, end = "completion", []  # the template's end of turn closes the answer
    else:
        prompt, end = plain_text(prompt), [tokenizer.eos_token_id]
    p_ids, c_ids = encode_pair(tokenizer, prompt, completion)
    ids = (p_ids + c_ids + end)[:max_length]
    return ids, max(len(p_ids) - 1, 0) if loss_on == "completion" else 0


def tokenize_pair(
    tokenizer, prompt: str | list[dict], completion: str, max_length: int, loss_on: str, chat_template: bool = False
) -> dict:
    ids, no_loss = pair_ids(tokenizer, prompt, completion, max_length, loss_on, chat_template)
    n = len(ids)
    input_ids = np.full(max_length, tokenizer.pad_token_id, dtype=np.int64)
    input_ids[:n] = ids
    mask = np.zeros(max_length, dtype=np.int64)
    mask[:n] = 1
    labels = np.full(max_length, IGNORE, dtype=np.int64)
    labels[: n - 1] = ids[1:]
    labels[:no_loss] = IGNORE
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pad_rows(lengths: np.ndarray, values: np.ndarray, no_loss: np.ndarray, max_length: int, pad_id: int) -> dict:
    """`tokenize_pair`'s rows, as (rows, max_length) arrays, from the rows' token ids laid end to
    end (`values`), their lengths and their `no_loss` counts (`pair_ids`)."""
    pos = np.arange(max_length)
    real = pos < lengths[:, None]
    input_ids = np.full(real.shape, pad_id, dtype=np.int64)
    input_ids[real] = values
    labels = np.full(real.shape, IGNORE, dtype=np.int64)
    labels[:, :-1] = np.where(real[:, 1:], input_ids[:, 1:], IGNORE)
    labels[pos < no_loss[:, None]] = IGNORE
    return {"input_ids": input_ids, "attention_mask": real.astype(np.int64), "labels": labels}


def tokenize_pairs(pairs: list[dict], base: str, data: DataConfig) -> list[dict]:
    """Rows of fixed-length int64 arrays for a list of pairs."""
    tok = _tokenizer(base)
    return [
        tokenize_pair(tok, r["prompt"], r["completion"], data.max_length, data.loss_on, data.chat_template)
        for r in pairs
    ]


# --- the streamed path ------------------------------------------------------------------------


def chunk_file(d: str | Path, k: int) -> Path:
    return Path(d) / f"chunk-{k:05d}.parquet"


def write_chunks(path: str, base: str, data: DataConfig, out_dir: str, chunk_rows: int) -> tuple[int, int]:
    """Stream a file's pairs into chunks of token ids under `out_dir` (chunk k holds rows
    [k * chunk_rows, (k + 1) * chunk_rows)); (rows, the pad token id). Runs in a Ray task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = _tokenizer(base)
    schema = pa.schema([("ids", pa.list_(pa.int32())), ("no_loss", pa.int32())])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ids: list[list[int]] = []
    no_loss: list[int] = []
    n = 0

    def flush() -> None:
        table = pa.Table.from_pydict({"ids": ids, "no_loss": no_loss}, schema=schema)
        pq.write_table(table, chunk_file(out_dir, (n - 1) // chunk_rows))
        ids.clear()
        no_loss.clear()

    for pair in iter_pairs(path, data.task, data.task_options):
        row, nl = pair_ids(tok, pair["prompt"], pair["completion"], data.max_length, data.loss_on, data.chat_template)
        ids.append(row)
        no_loss.append(nl)
        n += 1
        if len(ids) == chunk_rows:
            flush()
    if ids:
        flush()
    if n == 0:
        raise MuscleError(f"{path}: no rows")
    return n, int(tok.pad_token_id)


def _write_remote(*args) -> tuple[int, int]:
    """`write_chunks` on this node (`runtime.run_here`): the data file and the chunks are its local files."""
    from muscle_ray.runtime import run_here

    return run_here(write_chunks, *args)


def _pieces(d: str, chunk_rows: int, start: int, stop: int) -> list[dict]:
    """(file, start, stop) slices of the chunks holding rows [start, stop), one per chunk."""
    out = []
    for k in range(start // chunk_rows, -(-stop // chunk_rows)):
        lo, hi = max(start, k * chunk_rows), min(stop, (k + 1) * chunk_rows)
        out.append({"file": str(chunk_file(d, k)), "start": lo - k * chunk_rows, "stop": hi - k * chunk_rows})
    return out


def _read_chunk(batch: dict, max_length: int, pad_id: int) -> dict:
    """Slices of chunk files -> their padded rows (a task on the driver's node)."""
    import pyarrow.compute as pc

    from muscle_ray.runtime import read_slices

    t = read_slices(batch)
    ids = t.column("ids")
    lengths = pc.list_value_length(ids).to_numpy()
    values = pc.list_flatten(ids).to_numpy()
    return pad_rows(lengths, values, t.column("no_loss").to_numpy(), max_length, pad_id)


def _chunk_dataset(pieces: list[dict], max_length: int, pad_id: int):
    """A Dataset of the padded rows of `pieces`, one block each, in order (`runtime.read_here`:
    read on this node, where the chunks are, and never fused with the teacher cache's pool)."""
    from muscle_ray.runtime import read_here

    return read_here(pieces, partial(_read_chunk, max_length=max_length, pad_id=pad_id))


def streams(data: DataConfig) -> bool:
    """Whether `build_datasets` streams: `stream: on`, or auto and a training file over
    STREAM_THRESHOLD bytes."""
    if data.stream != "auto":
        return data.stream == "on"
    p = Path(data.path)
    return p.is_file() and p.stat().st_size > STREAM_THRESHOLD


def _split(n: int, val_fraction: float) -> int:
    """How many rows of the tail are held out; 0 when too few to hold any out (or all)."""
    n_val = int(round(n * val_fraction))
    return 0 if n_val == n else n_val


def build_datasets(data: DataConfig, base: str, work_dir: str | Path | None = None) -> Datasets:
    """(train, val) Ray Datasets of tokenized rows and their sizes; val is the held-out tail
    (the last `val_fraction` of the rows) when there is no val_path.

    In memory (small files): tokenizing happens once, here on the driver (starting Ray Data
    workers that import transformers costs more for adapter-sized data); the workers then read
    their shards of the resulting dataset every epoch. Streamed: see the module docstring;
    the chunks go under `work_dir` (a temporary directory removed at exit when None), which
    must outlive the datasets.
    """
    if streams(data):
        return _streamed(data, base, work_dir)
    import ray

    train_pairs = read_pairs(data.path, data.task, data.task_options)
    if data.val_path:
        val_pairs = read_pairs(data.val_path, data.task, data.task_options)
    else:
        n_val = _split(len(train_pairs), data.val_fraction)
        if n_val == 0:
            val_pairs = train_pairs  # too small to hold out: validate on the training set
        else:
            train_pairs, val_pairs = train_pairs[:-n_val], train_pairs[-n_val:]
    return Datasets(
        ray.data.from_items(tokenize_pairs(train_pairs, base, data)),
        ray.data.from_items(tokenize_pairs(val_pairs, base, data)),
        len(train_pairs),
        len(val_pairs),
        streamed=False,
    )


def _streamed(data: DataConfig, base: str, work_dir: str | Path | None) -> Datasets:
    if work_dir is None:
        import atexit
        import shutil

        work_dir = tempfile.mkdtemp(prefix="muscle-train-data-")
        atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    C = CHUNK_ROWS
    d = str(Path(work_dir) / "train")
    n, pad_id = _write_remote(data.path, base, data, d, C)
    if data.val_path:
        v = str(Path(work_dir) / "val")
        n_val, _ = _write_remote(data.val_path, base, data, v, C)
        train, val = _pieces(d, C, 0, n), _pieces(v, C, 0, n_val)
    else:
        held = _split(n, data.val_fraction)
        if held == 0:
            train, val, n_val = _pieces(d, C, 0, n), _pieces(d, C, 0, n), n
        else:
            n, n_val = n - held, held
            train, val = _pieces(d, C, 0, n), _pieces(d, C, n, n + held)
    L = data.max_length
    return Datasets(_chunk_dataset(train, L, pad_id), _chunk_dataset(val, L, pad_id), n, n_val, streamed=True)


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
