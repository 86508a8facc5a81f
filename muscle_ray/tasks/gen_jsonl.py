"""`gen_jsonl`: your own generation data, scored by exact match or ROUGE.

One JSON object per line (or one Parquet row), either a prompt and its answer::

    {"id"?: str|int, "prompt": str, "reference": str}      ("completion" may stand for "reference")

or a conversation whose last message is the answer (the reference)::

    {"id"?: str|int, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

so a training file (`prompt`/`completion` or `messages`) scores as it is. The model greedily
continues the prompt (with `chat_template: true`, the conversation rendered by the model's chat
template, see `muscle_ray.chat`) until a stop string or `max_new_tokens`; the text before the
first stop string is the prediction. Task options (`get_task("gen_jsonl", **options)`):

* `metric`: "exact" (default; prediction and reference equal after stripping surrounding
  whitespace, so a flip is a right answer turning wrong) or "rouge1" / "rouge2" / "rougeL"
  (F1 from rouge-score with stemming; continuous, so `correct` is null).
* `stop`: stop strings, default ["\\n\\n"] (lm-eval's default `until`).
* `max_new_tokens`: default 256 (lm-eval's default `max_gen_toks`).

`id` defaults to the 0-based line number. Invalid JSON or a missing/non-string field is a bad
row with the reason; the rest of the file is scored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from muscle_ray.chat import split_messages
from muscle_ray.tasks.base import Instance, register
from muscle_ray.tasks.common import GenerationOptions, GenerativeTask, need, record_id


class GenOptions(GenerationOptions):
    metric: Literal["exact", "rouge1", "rouge2", "rougeL"] = "exact"
    stop: list[str] = ["\n\n"]

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v):
        """A single string (as from a command line) means one stop string."""
        return [v] if isinstance(v, str) else v


@register
class GenJsonl(GenerativeTask):
    name = "gen_jsonl"
    metric = "exact"
    Options = GenOptions
    options: GenOptions
    target_delimiter = ""  # your prompt and reference are trained on as they are

    def __init__(self, **options):
        super().__init__(**options)
        self.metric, self.stop = self.options.metric, list(self.options.stop)

    def instance(self, doc: dict, row: int) -> Instance:
        if doc.get("messages") is not None:  # (a Parquet row has every column, null where unused)
            prompt, reference = split_messages(doc["messages"], row)
            return self.generation(record_id(doc, row), prompt, reference)
        answer = "completion" if doc.get("reference") is None and doc.get("completion") is not None else "reference"
        return self.generation(record_id(doc, row), need(doc, "prompt", str, row), need(doc, answer, str, row))
