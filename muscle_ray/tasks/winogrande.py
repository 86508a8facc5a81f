"""`winogrande`: WinoGrande (Sakaguchi et al. 2019), fill-in-the-blank, lm-eval's partial scoring.

Reads two layouts:

* the original release `{"qID", "sentence", "option1", "option2", "answer": "1"|"2"}`;
* MosaicML llm-foundry's re-format `{"context_options": [str, str], "continuation": str, "gold": 0|1}`
  (the sentence already split at the blank `_`, with each option filled in).

Prompt (lm-eval 0.4.13 `winogrande`): one context per option, sentence[:blank] + option, and
the shared continuation " " + sentence[blank+1:].strip(); log P(continuation | context_i) picks
the option. `choice_chars` are len() of those contexts (lm-eval's doc_to_choice strings).
ids: `qID` when present, else the 0-based row. Training split: the release's `train_xl.jsonl`
(or any train size), original layout.
"""

from __future__ import annotations

from muscle_ray.errors import BadRow
from muscle_ray.tasks.base import Instance, register
from muscle_ray.tasks.common import MultipleChoiceTask, as_index, mc_instance, need, record_id


@register
class WinoGrande(MultipleChoiceTask):
    name = "winogrande"
    default_path = "winogrande/winogrande_dev.llmfoundry.jsonl"
    training_path = "winogrande/train_xl.jsonl"

    def instance(self, doc: dict, row: int) -> Instance:
        if "context_options" in doc:
            contexts = need(doc, "context_options", list, row)
            continuation = need(doc, "continuation", str, row).strip()
            label = need(doc, "gold", object, row)
        else:
            sentence = need(doc, "sentence", str, row)
            if "_" not in sentence:
                raise BadRow("field 'sentence' has no blank '_'", row)
            blank = sentence.index("_")
            contexts = [sentence[:blank] + need(doc, option, str, row) for option in ("option1", "option2")]
            continuation = sentence[blank + 1 :].strip()
            label = as_index(need(doc, "answer", object, row), "answer", row) - 1
        # the contexts are lm-eval's doc_to_choice strings; mc_instance checks them as options
        return mc_instance(
            self.name, record_id(doc, row, "qID"), row, contexts, contexts, label, continuation=continuation
        )
