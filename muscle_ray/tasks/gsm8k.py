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
"""

from __future__ import annotations

import re

from pydantic import Field

from muscle_ray.errors import MuscleError
from muscle_ray.tasks.base import Instance, register
from muscle_ray.tasks.common import FileTask, Options, cut_at_stop, load_json, need, read_lines, record_id

STOP = ["Question:", "</s>", "<|im_end|>"]
STRICT_MATCH = re.compile(r"#### (\-?[0-9\.\,]+)")
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]   # gsm8k.yaml exact_match regexes_to_ignore
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


class Gsm8kOptions(Options):
    num_fewshot: int = Field(0, ge=0)
    fewshot_path: str | None = None
    max_new_tokens: int = Field(256, gt=0)   # lm-eval's default max_gen_toks


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@register
class Gsm8k(FileTask):
    name = "gsm8k"
    kind = "gen"
    metric = "exact"
    default_path = "gsm8k/test.jsonl"
    Options = Gsm8kOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.fewshot = self._fewshot_prefix()

    def _fewshot_prefix(self) -> str:
        n, path = self.options.num_fewshot, self.options.fewshot_path
        if n == 0:
            return ""
        if path is None:
            raise MuscleError(f"task gsm8k: num_fewshot={n} needs fewshot_path (a GSM8K train.jsonl)")
        shots = []
        for row, raw in read_lines(path):
            if len(shots) == n:
                break
            doc = load_json(raw, row)
            shots.append(f"{prompt(need(doc, 'question', str, row))} {need(doc, 'answer', str, row)}\n\n")
        if len(shots) < n:
            raise MuscleError(f"{path}: num_fewshot={n} but the file has only {len(shots)} examples")
        return "".join(shots)

    def parse(self, raw: str, row: int) -> Instance:
        doc = load_json(raw, row)
        return Instance(
            id=record_id(doc, row), task=self.name, kind="gen",
            contexts=[self.fewshot + prompt(need(doc, "question", str, row))],
            reference=need(doc, "answer", str, row), stop=list(STOP), max_new_tokens=self.options.max_new_tokens,
        )

    def score_generation(self, inst: Instance, text: str) -> tuple[bool | None, float, str]:
        prediction = cut_at_stop(text, inst.stop)
        correct = normalize(extract_answer(prediction)) == normalize(inst.reference)
        return correct, float(correct), prediction

    def training_pair(self, inst: Instance) -> tuple[str, str]:
        """The worked solution, after lm-eval's target delimiter, as in a few-shot example."""
        return inst.contexts[0], " " + inst.reference
