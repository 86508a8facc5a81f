"""`mc_jsonl`: your own multiple-choice data, scored by log-likelihood like lm-eval's tasks.

One JSON object per line::

    {"id"?: str|int, "context": str, "choices": [str, ...], "label": int, "target_delimiter"?: str}

* `context` is the prompt; option i is scored as log P(target_delimiter + choices[i] | context).
* `target_delimiter` defaults to " " (lm-eval's default); use "" when the context already ends
  in a space or newline.
* `label` is the 0-based index of the correct choice (an int, or a digit string).
* `id` defaults to the 0-based line number; give your own to keep ids stable when rows move.

Metrics: acc, and acc_norm dividing each option's log-likelihood by len(choice) in characters.
Rows that break these rules (invalid JSON, missing field, no options, empty choice, label out
of range) are reported as bad rows with the reason, and the rest of the file is scored.
"""

from __future__ import annotations

from muscle_ray.tasks.base import Instance, register
from muscle_ray.tasks.common import MultipleChoiceTask, mc_instance, need, record_id


@register
class McJsonl(MultipleChoiceTask):
    name = "mc_jsonl"

    def instance(self, doc: dict, row: int) -> Instance:
        delimiter = " " if doc.get("target_delimiter") is None else need(doc, "target_delimiter", str, row)
        return mc_instance(
            self.name,
            record_id(doc, row),
            row,
            need(doc, "context", str, row),
            need(doc, "choices", list, row),
            need(doc, "label", object, row),
            delimiter,
        )
