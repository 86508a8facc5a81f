"""`hellaswag`: HellaSwag (Zellers et al. 2019), 4-way sentence completion, as lm-eval renders it.

Reads the official JSON Lines schema (`ind, activity_label, ctx_a, ctx_b, endings, label`, the
val file or any sample of it) and, when the path ends in `.txt`, llama.cpp's 6-lines-per-item
text format (`activity_label: ctx`, gold label, 4 endings).

Prompt (lm-eval 0.4.13 `hellaswag`, `utils.process_docs`): context =
preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), options = preprocess(ending),
target delimiter " ". ids: the record's `ind` (jsonl) or the 0-based item number (text).
Training split: the release's `hellaswag_train.jsonl`, same schema.

The text format is llama.cpp's own rendering: it joined ctx_a and ctx_b *without* lm-eval's
capitalisation of ctx_b, which cannot be recovered, so its contexts match lm-eval only where
ctx_b is empty or already capitalised.
"""

from __future__ import annotations

import re
from typing import Iterator

from muscle_ray.errors import BadRow
from muscle_ray.tasks.base import Instance, Record, register
from muscle_ray.tasks.common import MultipleChoiceTask, as_index, mc_instance, need, read_lines, record_id

LLAMACPP = "llama.cpp"  # the text layout's name on its records
LLAMACPP_LINES = 6


def preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: drop WikiHow's [tags], collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@register
class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    default_path = "hellaswag/val_sample1000.jsonl"
    training_path = "hellaswag/hellaswag_train.jsonl"

    def records(self, path: str) -> Iterator[Record]:
        if not str(path).endswith(".txt"):
            yield from super().records(path)
            return
        # llama.cpp text: item k is lines 6k..6k+5
        item: list[str] = []
        for line_no, line in read_lines(path, keep_blank=True):
            item.append(line)
            if len(item) == LLAMACPP_LINES:
                yield Record(line_no // LLAMACPP_LINES, tuple(item), LLAMACPP)
                item = []
        if item and any(x.strip() for x in item):
            yield Record(line_no // LLAMACPP_LINES, tuple(item), LLAMACPP)

    def parse(self, record: Record) -> Instance:
        if record.layout == LLAMACPP:
            return self._text_item(record.lines, record.row)
        return super().parse(record)

    def instance(self, doc: dict, row: int) -> Instance:
        ctx = need(doc, "ctx_a", str, row) + " " + need(doc, "ctx_b", str, row).capitalize()
        query = preprocess(need(doc, "activity_label", str, row) + ": " + ctx)
        endings = need(doc, "endings", list, row)
        choices = [preprocess(e) if isinstance(e, str) else e for e in endings]
        return mc_instance(self.name, record_id(doc, row, "ind"), row, query, choices, need(doc, "label", object, row))

    def _text_item(self, lines: tuple[str, ...], row: int) -> Instance:
        """`activity_label: ctx`, the gold label, then the 4 endings, one per line."""
        if len(lines) != LLAMACPP_LINES:
            raise BadRow(f"incomplete item: {len(lines)} of {LLAMACPP_LINES} lines", row)
        label = as_index(lines[1], "label", row)
        return mc_instance(self.name, str(row), row, preprocess(lines[0]), [preprocess(e) for e in lines[2:]], label)
