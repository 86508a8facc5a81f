"""`piqa`: PIQA (Bisk et al. 2020), 2-way physical commonsense, as lm-eval renders it.

Reads the official release: `valid.jsonl` (`goal, sol1, sol2`) with its gold labels in a
separate file, one `0`/`1` per line aligned by line (`valid-labels.lst` beside it, found by
name: `X.jsonl` -> `X-labels.lst`), or the file named by the `labels` option. Without a labels
file, a `label` field in each record is used (Hugging Face exports).

Prompt (lm-eval 0.4.13 `piqa`): context "Question: {goal}\\nAnswer:", options [sol1, sol2]
verbatim (trailing spaces kept), target delimiter " ". ids: the 0-based row.
Training split: the release's `train.jsonl` with `train-labels.lst` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.tasks.base import Instance, Record, register
from muscle_ray.tasks.common import MultipleChoiceTask, Options, mc_instance, need, read_lines, record_id


class PiqaOptions(Options):
    labels: str | None = None  # the labels file; default: X-labels.lst beside X.jsonl


def labels_beside(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(p.name.removesuffix(".jsonl") + "-labels.lst")


@register
class Piqa(MultipleChoiceTask):
    name = "piqa"
    default_path = "piqa/valid.jsonl"
    training_path = "piqa/train.jsonl"
    Options = PiqaOptions
    options: PiqaOptions

    def records(self, path: str) -> Iterator[Record]:
        """Each record is a data line with its label from the labels file, aligned by line."""
        labels_path = Path(self.options.labels) if self.options.labels else labels_beside(path)
        if not labels_path.is_file():
            if self.options.labels:
                raise MuscleError(f"{labels_path}: no such labels file")
            yield from super().records(path)
            return
        labels = labels_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        rows = list(read_lines(path, keep_blank=True))
        while rows and not rows[-1][1].strip():
            rows.pop()
        if len(labels) != len(rows):
            raise MuscleError(
                f"{labels_path}: {len(labels)} labels for {len(rows)} rows of {path}; they must align by line"
            )
        for (row, line), label in zip(rows, labels):
            if line.strip():
                yield Record(row, (line,), extra={"label": label.strip()})

    def instance(self, doc: dict, row: int) -> Instance:
        if "label" not in doc:
            raise BadRow("missing field 'label' (and no labels file such as valid-labels.lst beside the data)", row)
        goal = need(doc, "goal", str, row)
        choices = [need(doc, "sol1", str, row), need(doc, "sol2", str, row)]
        return mc_instance(self.name, record_id(doc, row), row, f"Question: {goal}\nAnswer:", choices, doc["label"])
