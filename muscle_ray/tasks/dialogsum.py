"""`dialogsum`: DialogSum (Chen et al. 2021) dialogue summarisation, scored by ROUGE-1.

Reads the official JSON Lines: `{"fname", "dialogue", "summary1", "summary2", "summary3", ...}`
(test split: three human summaries) or `{"fname", "dialogue", "summary", ...}` (train/dev).

DialogSum stands in for SAMsum (MUSCLE's summarisation task, not redistributable), so the
prompt follows MUSCLE's SAMsum task: "Dialogue: {dialogue}\\nSummary:", greedy generation until
"Dialogue:", "Summary:", "</s>" or a blank line. MUSCLE also sets no_repeat_ngram_size=2,
which an Instance cannot carry; scorers generate plain greedy.

Score: ROUGE-1 F1 (rouge-score, stemming) of the generation against ONE reference, the option
`reference` = "summary1" | "summary2" | "summary3" | "summary"; by default summary1 where a
record has three (test) and `summary` where it has one (train, dev). One fixed reference keeps a
per-instance score comparable across model versions; summary1 is the first annotator's.
ROUGE is continuous, so `correct` is null. ids: `fname` (test_0 ...), else the 0-based row.
Training split: `dialogsum.train.jsonl` (one `summary` per dialogue).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from muscle_ray.tasks.base import Instance, register
from muscle_ray.tasks.common import GenerationOptions, GenerativeTask, need, record_id

STOP = ["Dialogue:", "Summary:", "</s>", "\n\n"]


class DialogSumOptions(GenerationOptions):
    reference: Literal["summary1", "summary2", "summary3", "summary"] | None = None
    max_new_tokens: int = Field(128, gt=0)


@register
class DialogSum(GenerativeTask):
    name = "dialogsum"
    metric = "rouge1"
    default_path = "dialogsum/dialogsum.test.jsonl"
    training_path = "dialogsum/dialogsum.train.jsonl"
    Options = DialogSumOptions
    options: DialogSumOptions
    stop = STOP

    def instance(self, doc: dict, row: int) -> Instance:
        reference = self.options.reference or ("summary" if "summary1" not in doc and "summary" in doc else "summary1")
        return self.generation(
            record_id(doc, row, "fname"),
            f"Dialogue: {need(doc, 'dialogue', str, row)}\nSummary:",
            need(doc, reference, str, row),
        )
