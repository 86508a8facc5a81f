"""A tiny synthetic world: people of twelve families, each with a home city and a pet.

It yields both the bases' pretraining corpora and the three demo tasks, so that what a task
model gets right comes from what its base read, as with real LLMs:

- **Knowledge.** A person's home and pet follow their family's (the family's city and pet) with
  probability `p_home` / `p_pet`, else they are one of the others: part rule, part fact to memorise.
  A base's corpus covers some families (`BaseConfig.families`): v1 and v2 read different ones
  (v2 more of them), so each knows people the other never read about, and its guesses about
  the rest come from the family rules it learnt. That is where the flips come from.
- **Habit.** Trips are told with one verb in each corpus (`BaseConfig.style`: "went to",
  "flew to", "headed to"); the trip task's summaries always say "went to" (v1's habit), so v2's
  summariser unlearns its base's verb from the labels. (With summaries mixing verbs, 60/20/20,
  the v2 summariser kept its base's "headed to" and the update lost 12 ROUGE-1 points to habit
  alone, v1 72 -> v2 60.)
- **Mentions.** Every task context first asks about other people and answers otherwise
  ("q: where is tam berg from? a: ask sol."), so that a base's knowledge shows there: the
  task's labels say nothing about them, v1's next-token distribution there does. The task's
  texts were written in v1's time: they name people of the families v1 read about
  (`ZooConfig.mentions_of`), of every split, as real task data keeps naming the entities
  of its day while a newer base reads about newer ones. This is the information MUSCLE's
  all-token distillation can carry and plain cross-entropy cannot. (Its mask sends every such
  position to v1, since no teacher predicts the text's "ask": naming v2-only people too would
  distil v1's guesses about people v2 knows, the `mentions_of: all` option.)

Task people are split into train / val / test people, so no test question is asked in
training: a test answer is known from pretraining or guessed from a family rule.
"""

from __future__ import annotations

import random

_C, _V, _END = "bdfgklmnprstvz", "aeiou", "lmnrst"
_TAKEN = set("bat rat pet pot sit set met ran pin tin ton son sun fun gun run ten den men".split())
GIVEN = [n for n in sorted({c + v + e for c in _C for v in _V for e in _END}) if n not in _TAKEN][::5][:80]
FAMILIES = "ito berg moss vale ford lund cruz park nash reed shaw wolf".split()
CITIES = "rome oslo lima kyiv riga bern doha lyon pune nice cork baku".split()
PETS = "cat dog fox owl rat bat cow pig hen yak eel ant".split()
STYLES = {"went": "went to", "flew": "flew to", "headed": "headed to"}
SUMMARY_VERB = STYLES["went"]  # the trip summaries' verb (the Habit bullet above)
# How the corpus asks about a person; the tasks and the context questions ask the same way.
ASK = {"home": "q: where is {} from? a:", "pet": "q: what pet has {}? a:"}


def people(seed: int, p_home: float, p_pet: float) -> dict[str, dict]:
    """Everyone in the world: name -> {family, city, pet}. Fixed by `seed`, shared by all bases."""
    rng = random.Random(seed)
    out = {}
    for f, family in enumerate(FAMILIES):
        for given in GIVEN:
            city = CITIES[f] if rng.random() < p_home else rng.choice([c for c in CITIES if c != CITIES[f]])
            pet = PETS[f] if rng.random() < p_pet else rng.choice([p for p in PETS if p != PETS[f]])
            out[f"{given} {family}"] = {"family": f, "city": city, "pet": pet}
    return out


def split_people(world: dict, seed: int, val: float, test: float) -> dict[str, list[str]]:
    """Disjoint train / val / test people (every family in each)."""
    rng = random.Random(seed)
    names = sorted(world)
    rng.shuffle(names)
    n_test, n_val = int(len(names) * test), int(len(names) * val)
    return {"test": names[:n_test], "val": names[n_test : n_test + n_val], "train": names[n_test + n_val :]}


# --- the pretraining corpus --------------------------------------------------------------------


def corpus(world: dict, families: list[int], n_docs: int, seed: int, style: str) -> list[str]:
    """Documents of a few sentences about the people of `families` (and some filler)."""
    rng = random.Random(seed)
    names = [n for n, p in world.items() if p["family"] in families]
    verb = STYLES[style]
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.3:
                a, b = rng.sample(GIVEN, 2)
                parts.append(
                    rng.choice(
                        [f"{a} met {b}.", f"it is cold in {rng.choice(CITIES)}.", f"a {rng.choice(PETS)} ran off."]
                    )
                )
                continue
            n = rng.choice(names)
            p = world[n]
            parts.append(
                rng.choice(
                    [
                        f"{n} lives in {p['city']}.",
                        f"{n} keeps a {p['pet']}.",
                        f"{n} {verb} {p['city']} with a {p['pet']}.",
                        f"{ASK['home'].format(n)} {p['city']}.",
                        f"{ASK['pet'].format(n)} {p['pet']}.",
                    ]
                )
            )
        docs.append(" ".join(parts))
    return docs


# --- the three tasks ---------------------------------------------------------------------------


def mentions(named: list[str], rng: random.Random, frame: str, k: int) -> str:
    """`k` questions about random people of `named` that the text answers otherwise ("q: where is
    tam berg from? a: ask sol."): at the answer a base's knowledge shows, the label does not."""
    return "".join(f"{ASK[frame].format(m)} ask {rng.choice(GIVEN)}. " for m in rng.sample(named, k))


def make_home_mc(world: dict, name: str, rng: random.Random, k: int, others: list[str], named: list[str]) -> dict:
    """'... q: where is vin berg from? a:' -> one of four cities (log-likelihood choice, as
    HellaSwag). The tasks ask as the corpus does: the bases' knowledge is what they test."""
    city = world[name]["city"]
    options = rng.sample([c for c in CITIES if c != city], 3) + [city]
    rng.shuffle(options)
    return {
        "context": mentions(named, rng, "home", k) + ASK["home"].format(name),
        "choices": options,  # scored after lm-eval's default target_delimiter " "
        "label": options.index(city),
        "completion": " " + city,
    }


def make_pet_em(world: dict, name: str, rng: random.Random, k: int, others: list[str], named: list[str]) -> dict:
    """'... q: what pet has nam shaw? a:' -> 'hen' (exact match of a generated answer)."""
    pet = world[name]["pet"]
    prompt = mentions(named, rng, "pet", k) + ASK["pet"].format(name)
    return {"prompt": prompt, "reference": pet, "completion": f" {pet}."}


def make_trip_rouge(world: dict, name: str, rng: random.Random, k: int, others: list[str], named: list[str]) -> dict:
    """A two-line dialogue -> 'they went to rome and oslo.' (SAMsum-like, ROUGE-1): a summariser
    is paid for its base's knowledge of both homes."""
    other = rng.choice([m for m in others if m != name])
    summary = f"they {SUMMARY_VERB} {world[name]['city']} and {world[other]['city']}."
    return {
        "prompt": mentions(named, rng, "home", k) + f"dialogue: {name}: i am off home. {other}: me too. summary:",
        "reference": summary,
        "completion": " " + summary,
    }


TASKS = {"home_mc": make_home_mc, "pet_em": make_pet_em, "trip_rouge": make_trip_rouge}


def tokenizer_text(world: dict) -> list[str]:
    """Text the shared tokenizer is trained on: every word of the world and of the task formats."""
    rng = random.Random(0)
    every = list(range(len(FAMILIES)))
    text: list[str] = []
    for style in STYLES:
        text += corpus(world, every, 200, seed=len(text), style=style)
    names = sorted(world)
    for make in TASKS.values():
        for _ in range(100):
            rec = make(world, rng.choice(names), rng, 2, names, names)
            text.append((rec.get("prompt") or rec["context"]) + rec["completion"])
    return text
