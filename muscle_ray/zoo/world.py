"""A tiny synthetic world: people holding items. It yields both the bases' pretraining corpus
and the three demo tasks, so task skill is learnt (imperfectly) in pretraining, as in real LLMs.

Lessons from a first CPU experiment (shared/docs/miniature-lessons.md) shape it: the corpus holds
arithmetic facts and QA-like text *close to but not equal to* the task formats (without that,
adapters cannot unlock the skill), and skill emerges sharply with pretraining steps, which makes
the number of steps each base gets the knob for its accuracy.
"""

from __future__ import annotations

import random

NAMES = ["ann", "bob", "cal", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou"]
ITEMS = ["figs", "pears", "limes", "plums", "nuts", "eggs", "cups", "pens", "hats", "keys"]
MAX_N = 15  # default largest quantity: the knob for how hard the arithmetic is


def _people(rng: random.Random, k: int) -> list[str]:
    return rng.sample(NAMES, k)


# --- the three tasks -------------------------------------------------------------------------


def sum_question(rng: random.Random, max_n: int = MAX_N) -> tuple[str, int]:
    """'ann has 37 figs. bob has 48 figs. how many figs in all?' -> 85 (GSM8K-like)."""
    a, b = _people(rng, 2)
    item = rng.choice(ITEMS)
    x, y = rng.randint(1, max_n), rng.randint(1, max_n)
    return f"{a} has {x} {item}. {b} has {y} {item}. how many {item} in all?", x + y


def distractors(answer: int, rng: random.Random, k: int = 3) -> list[int]:
    """Near-miss options (off by one or ten, digits swapped) that a weak model confuses."""
    near = {answer + 1, answer - 1, answer + 10, answer - 10, int(str(answer)[::-1]), answer + 2, answer - 2}
    return rng.sample(sorted(c for c in near if c >= 0 and c != answer), k)


def make_sum_em(rng: random.Random, max_n: int = MAX_N) -> dict:
    q, ans = sum_question(rng, max_n)
    return {"prompt": q, "reference": str(ans), "completion": f" {ans}."}


def make_sum_mc(rng: random.Random, max_n: int = MAX_N) -> dict:
    q, ans = sum_question(rng, max_n)
    options = distractors(ans, rng) + [ans]
    rng.shuffle(options)
    return {"context": q, "choices": [str(o) for o in options], "label": options.index(ans), "completion": f" {ans}"}


def make_story_summary(rng: random.Random, max_n: int = MAX_N) -> dict:
    """A short 'dialogue' whose summary needs the names, the item and the total (SAMsum-like).

    ROUGE-1 gives partial credit: a wrong total or a dropped name costs a few unigrams, so
    v1 and v2 disagree by degrees, as summarisers do.
    """
    k = rng.choice([2, 3])
    people = _people(rng, k)
    item = rng.choice(ITEMS)
    counts = [rng.randint(1, max_n) for _ in people]
    lines = [f"{p}: i have {c} {item}." for p, c in zip(people, counts)]
    lines.append(f"{people[0]}: let us put them together.")
    names = " and ".join([", ".join(people[:-1]), people[-1]]) if k > 2 else " and ".join(people)
    summary = f"{names} put together {sum(counts)} {item}."
    return {"prompt": "dialogue: " + " ".join(lines) + " summary:", "reference": summary, "completion": " " + summary}


TASKS = {"sum_mc": make_sum_mc, "sum_em": make_sum_em, "story_rouge": make_story_summary}


# --- the pretraining corpus --------------------------------------------------------------------


def _fact(rng, max_n):
    x, y = rng.randint(0, max_n), rng.randint(0, max_n)
    return f"{x} + {y} = {x + y}."


def _statement(rng, max_n):
    return f"{rng.choice(NAMES)} has {rng.randint(1, max_n)} {rng.choice(ITEMS)}."


def _near_qa(rng, max_n):
    """Close to the tasks' formats but never equal to them."""
    a, b = _people(rng, 2)
    item = rng.choice(ITEMS)
    x, y = rng.randint(1, max_n), rng.randint(1, max_n)
    return rng.choice(
        [
            f"{a} had {x} {item} and {b} had {y} {item}, so together they had {x + y} {item}.",
            f"q: {x} {item} and {y} {item}. a: {x + y} {item}.",
            f"{a}: i have {x} {item}. {b}: i have {y} {item}. so {a} and {b} have {x + y} {item} in total.",
        ]
    )


def corpus(n_docs: int, seed: int, qa_share: float = 0.15, max_n: int = MAX_N) -> list[str]:
    """Documents of a few sentences; `qa_share` of sentences are task-like."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 5)):
            r = rng.random()
            parts.append(
                _near_qa(rng, max_n) if r < qa_share else _fact(rng, max_n) if r < 0.6 else _statement(rng, max_n)
            )
        docs.append(" ".join(parts))
    return docs


def tokenizer_text() -> list[str]:
    """Text the shared tokenizer is trained on: every word and symbol of the world."""
    rng = random.Random(0)
    sample = corpus(400, seed=0, qa_share=0.5)
    for make in TASKS.values():
        for _ in range(50):
            rec = make(rng)
            sample.append((rec.get("prompt") or rec["context"]) + rec["completion"])
    return sample
