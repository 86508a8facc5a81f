"""`arc_easy` / `arc_challenge`: AI2 Reasoning Challenge (Clark et al. 2018), as lm-eval renders it.

Reads three layouts:

* the original AI2 release `{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`;
* the Hugging Face `allenai/ai2_arc` rows
  `{"id", "question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}`;
* MosaicML llm-foundry's re-format `{"query": "Question: " + stem, "choices": [str, ...], "gold": int}`.

Prompt (lm-eval 0.4.13 `arc_easy`): context "Question: {stem}\\nAnswer:", options the choice
texts, target delimiter " "; the gold is the position of `answerKey` among the choice labels.
ids: `id` when present, else the 0-based row. Training split: the release's train file
(`ARC-Easy-Train.jsonl`) or the Hugging Face train shard (Parquet), in the layouts above.
"""

from __future__ import annotations

from muscle_ray.errors import BadRow
from muscle_ray.tasks.base import Instance, register
from muscle_ray.tasks.common import MultipleChoiceTask, mc_instance, need, record_id

FOUNDRY_PREFIX = "Question: "


def _original(doc: dict, row: int) -> tuple[str, list, int]:
    """(stem, choice texts, gold index) from the AI2 or Hugging Face layout."""
    question = doc.get("question")
    if isinstance(question, dict):  # AI2 release
        stem = need(question, "stem", str, row)
        options = need(question, "choices", list, row)
        if not all(isinstance(o, dict) for o in options):
            raise BadRow("field 'question.choices' must hold {text, label} objects", row)
        texts = [need(o, "text", str, row) for o in options]
        labels = [need(o, "label", str, row) for o in options]
    else:  # Hugging Face
        stem = need(doc, "question", str, row)
        choices = need(doc, "choices", dict, row)
        texts, labels = need(choices, "text", list, row), need(choices, "label", list, row)
    key = need(doc, "answerKey", str, row)
    if key not in labels:
        raise BadRow(f"answerKey {key!r} is not one of the choice labels {labels}", row)
    return stem, texts, labels.index(key)


@register
class ArcEasy(MultipleChoiceTask):
    name = "arc_easy"
    default_path: str | None = "arc_easy/arc_easy_test.llmfoundry.jsonl"
    training_path: str | None = "arc_easy/ARC-Easy-Train.jsonl"

    def instance(self, doc: dict, row: int) -> Instance:
        if "query" in doc:
            stem = need(doc, "query", str, row).removeprefix(FOUNDRY_PREFIX)
            texts, gold = need(doc, "choices", list, row), need(doc, "gold", object, row)
        else:
            stem, texts, gold = _original(doc, row)
        return mc_instance(self.name, record_id(doc, row), row, f"Question: {stem}\nAnswer:", texts, gold)


@register
class ArcChallenge(ArcEasy):
    name = "arc_challenge"
    default_path = None
    training_path = "arc_challenge/ARC-Challenge-Train.jsonl"
