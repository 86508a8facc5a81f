"""What every file-backed task shares: reading records, checking fields, ids, options, and
the two kinds of task (multiple choice, generation).

A task module should only hold its dataset's quirks; the plumbing below keeps the error
messages uniform ("missing field 'label'", "label 7 out of range for 4 options") so the
scoring job can log any bad row with a reason a user can act on.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from muscle_ray.chat import plain_text
from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.tasks.base import Instance, Record, Task


def read_lines(path: str | Path, keep_blank: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (row, line) for every non-blank line (every line with keep_blank); row is the
    0-based line number.

    Lines are decoded one by one (surrogateescape) so a single bad byte spoils one row, not
    the file: `load_json` turns it into a BadRow.
    """
    p = Path(path)
    if not p.is_file():
        raise MuscleError(f"{p}: no such file")
    with p.open("rb") as f:
        for row, line in enumerate(f):
            text = line.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
            if keep_blank or text.strip():
                yield row, text


def load_json(raw: str, row: int) -> dict[str, Any]:
    """Parse one JSON Lines record; a BadRow says why it is not a JSON object."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("not valid UTF-8", row) from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRow(f"invalid JSON ({e.msg} at column {e.colno})", row) from None
    if not isinstance(doc, dict):
        raise BadRow(f"invalid record: expected a JSON object, got {type(doc).__name__}", row)
    return doc


_TYPE_NAMES = {str: "a string", list: "a list", int: "an integer", dict: "an object"}


def need(doc: dict[str, Any], name: str, typ: type, row: int) -> Any:
    """doc[name], checked for presence and type (bool is not an int here)."""
    if name not in doc or doc[name] is None:
        raise BadRow(f"missing field '{name}'", row)
    value = doc[name]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BadRow(f"field '{name}' must be {_TYPE_NAMES.get(typ, typ.__name__)}, got {type(value).__name__}", row)
    return value


def as_index(value: Any, name: str, row: int) -> int:
    """A label given as an int or a digit string ("2"), as in HF copies of many datasets."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadRow(f"field '{name}' must be an integer, got {value!r}", row)


def record_id(doc: dict[str, Any], row: int, key: str = "id") -> str:
    """The record's own id when it has one (a stable id survives re-ordering), else the row."""
    value = doc.get(key)
    if value is None or value == "":
        return str(row)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise BadRow(f"field '{key}' must be a string or integer, got {type(value).__name__}", row)


def mc_instance(
    task: str,
    id: str,
    row: int,
    context: str | list[str],
    choices: list[Any],
    label: Any,
    delimiter: str = " ",
    continuation: str | None = None,
) -> Instance:
    """A checked multiple-choice Instance rendered the way lm-eval's construct_requests does.

    One context: option i is (context, delimiter + choices[i]). Several contexts (WinoGrande's
    partial scoring, lm-eval's "multiple input"): option i is (context[i], delimiter +
    continuation). `choice_chars` is len() of each doc_to_choice string, which is what
    lm-eval's acc_norm divides by.
    """
    if not isinstance(choices, list) or not choices:
        raise BadRow("no options", row)
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise BadRow(f"option {i} must be a string, got {type(c).__name__}", row)
        if not c:
            raise BadRow(f"empty choice: option {i} is an empty string", row)
    label = as_index(label, "label", row)
    if not 0 <= label < len(choices):
        raise BadRow(f"label {label} out of range for {len(choices)} options", row)
    if isinstance(context, list):
        assert continuation is not None and len(context) == len(choices)
        continuations = [delimiter + continuation] * len(choices)
    else:
        continuations = [delimiter + c for c in choices]
    return Instance(
        id=id,
        task=task,
        kind="mc",
        contexts=context if isinstance(context, list) else [context],
        continuations=continuations,
        choice_chars=[len(c) for c in choices],
        label=label,
        reference=str(label),
        delimiter=delimiter,
    )


class Options(BaseModel):
    """Base of a task's options: typed, validated, unknown names refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_options(task: str, model: type[Options], options: dict[str, Any]) -> Any:
    """A task's options, validated; a MuscleError names the task and every bad option."""
    try:
        return model(**options)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}" for err in e.errors())
        raise MuscleError(f"task {task}: bad option ({problems})") from None


def read_parquet(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (row, the row as one JSON object): a Parquet file (a Hugging Face dataset's shard,
    say) read through the same parsing as JSON Lines."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise MuscleError(f"{p}: no such file")
    row = 0
    for batch in pq.ParquetFile(p).iter_batches():
        for doc in batch.to_pylist():
            yield row, json.dumps(doc, ensure_ascii=False, default=str)
            row += 1


class FileTask(Task):
    """A task read from a JSON Lines (or Parquet) file and configured by its `Options` model.

    Subclasses set name/kind/metric/default_path, an `Options` subclass if they take any,
    and implement `instance` (one JSON record -> Instance); `records` and `parse` may be
    overridden for other layouts.
    """

    Options: type[Options] = Options

    def __init__(self, **options: Any):
        self.options = parse_options(self.name, self.Options, options)

    def records(self, path: str) -> Iterator[Record]:
        for row, line in read_parquet(path) if str(path).endswith(".parquet") else read_lines(path):
            yield Record(row, (line,))

    def parse(self, record: Record) -> Instance:
        """The record's JSON object, with any fields kept beside the file taking precedence."""
        doc = load_json(record.lines[0], record.row)
        return self.instance({**doc, **record.extra}, record.row)

    @abstractmethod
    def instance(self, doc: dict[str, Any], row: int) -> Instance:
        """One record's fields -> Instance; a BadRow (via `need`, `mc_instance`) says why not."""


class MultipleChoiceTask(FileTask):
    """Scored by comparing the options' log-likelihoods, as lm-eval's multiple_choice tasks."""

    kind = "mc"
    metric = "acc"


class GenerationOptions(Options):
    max_new_tokens: int = Field(256, gt=0)  # lm-eval's default max_gen_toks


class GenerativeTask(FileTask):
    """Scored on one greedy generation, which the scorers have already cut at the first stop
    string (`scoring.encode.cut_at_stop`, once, as lm-eval's generate_until returns it)."""

    kind = "gen"
    Options: type[Options] = GenerationOptions
    options: GenerationOptions
    stop: list[str] = ["\n\n"]  # lm-eval's default `until`
    target_delimiter = " "  # between prompt and gold answer in a training pair (lm-eval's few-shot layout)

    def generation(self, id: str, prompt: str | list[dict[str, str]], reference: str) -> Instance:
        """A generation from a prompt, or from a conversation (`chat.split_messages`'s first part)."""
        messages = None if isinstance(prompt, str) else prompt
        return Instance(
            id=id,
            task=self.name,
            kind="gen",
            contexts=[plain_text(prompt)],
            reference=reference,
            stop=list(self.stop),
            max_new_tokens=self.options.max_new_tokens,
            messages=messages,
        )

    def score(self, prediction: str, reference: str) -> tuple[bool | None, float]:
        """(correct, score): exact match is right/wrong, ROUGE is continuous (correct is None)."""
        if self.metric == "exact":
            ok = prediction.strip() == reference.strip()
            return ok, float(ok)
        from muscle_ray.metrics.text import rouge

        return None, float(rouge([prediction], [reference], kind=self.metric)[0])

    def score_generation(self, inst: Instance, text: str) -> tuple[bool | None, float, str]:
        return (*self.score(text, inst.reference), text)

    def training_pair(self, inst: Instance) -> tuple[str | list[dict[str, str]], str]:
        if inst.messages is not None:  # a conversation's answer is the assistant's message as it is
            return inst.messages, inst.reference
        return inst.contexts[0], self.target_delimiter + inst.reference
