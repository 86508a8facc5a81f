"""`gsm8k`: GSM8K (Cobbe et al. 2021) grade-school math, scored exactly as lm-eval's "strict-match".

Reads the official `{"question", "answer"}` JSON Lines; the reference answer ends in `#### N`.

Prompt (lm-eval 0.4.13 `gsm8k`): "Question: {question}\\nAnswer:", greedy generation until
"Question:", "</s>" or "<|im_end|>". Few-shot: `num_fewshot` examples (default 0 here; the
harness's default is 5) are the *first* n rows of `fewshot_path` (a GSM8K train file), each
rendered "Question: {q}\\nAnswer: {a}\\n\\n" -- lm-eval's layout with its `first_n` sampler
(the stock yaml draws them at random from the full train split instead).

Scoring: the strict-match filter takes the first "#### (-?[0-9.,]+)" in the generation
("[invalid]" when none); exact_match then deletes ",", "$", everything up to the last "#### ",
a trailing ".", and lower-cases, on the prediction and the reference alike. ids: the 0-based row.
Training split: the train file (here its first 1000 rows), same layout; a pair is the prompt and
" " + the worked answer, so an adapter learns to end with lm-eval's `#### N`.
"""

from __future__ import annotations

import re

from pydantic import Field

from muscle_ray.errors import MuscleError
from muscle_ray.tasks.base import Instance, register
from muscle_ray.tasks.common import GenerationOptions, GenerativeTask, load_json, need, read_lines, record_id

STOP = ["Question:", "</s>", "<|im_end|>"]
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # gsm8k.yaml exact_match regexes_to_ignore
FALLBACK = "[invalid]"


def extract_answer(generation: str) -> str:
    """lm-eval's strict-match filter: the first `#### number`, stripped, else "[invalid]"."""
    found = STRICT_MATCH.findall(generation)
    return found[0].strip() if found else FALLBACK


def normalize(text: str) -> str:
    """lm-eval's exact_match preprocessing for gsm8k (regexes_to_ignore, ignore_case)."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


class Gsm8kOptions(GenerationOptions):
    num_fewshot: int = Field(0, ge=0)
    fewshot_path: str | None = None


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@register
class Gsm8k(GenerativeTask):
    name = "gsm8k"
    metric = "exact"
    default_path = "gsm8k/test.jsonl"
    training_path = "gsm8k/train_first1000.jsonl"
    Options = Gsm8kOptions
    options: Gsm8kOptions
    stop = STOP

    def __init__(self, **options):
        super().__init__(**options)
        self.fewshot = self._fewshot_prefix()

    def _fewshot_prefix(self) -> str:
        n, path = self.options.num_fewshot, self.options.fewshot_path
        if n == 0:
            return ""
        if path is None:
            raise MuscleError(f"task gsm8k: num_fewshot={n} needs fewshot_path (a GSM8K train.jsonl)")
        shots: list[str] = []
        for row, raw in read_lines(path):
            if len(shots) == n:
                break
            doc = load_json(raw, row)
            shots.append(f"{prompt(need(doc, 'question', str, row))} {need(doc, 'answer', str, row)}\n\n")
        if len(shots) < n:
            raise MuscleError(f"{path}: num_fewshot={n} but the file has only {len(shots)} examples")
        return "".join(shots)

    def instance(self, doc: dict, row: int) -> Instance:
        return self.generation(
            record_id(doc, row), self.fewshot + prompt(need(doc, "question", str, row)), need(doc, "answer", str, row)
        )

    def score(self, prediction: str, reference: str) -> tuple[bool | None, float]:
        """Strict match: the first `#### number` of the prediction against the reference's."""
        correct = normalize(extract_answer(prediction)) == normalize(reference)
        return correct, float(correct)
