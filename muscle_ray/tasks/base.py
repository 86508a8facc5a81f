"""What a task is: records in a published format -> instances a scorer can run.

Scorers (HF, vLLM) and the scoring job only see `Record`s and `Instance`s; every dataset quirk
(separate label files, lm-eval prompt templates, answer extraction) stays in the task module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

from muscle_ray.errors import BadRow, MuscleError


@dataclass(frozen=True)
class Record:
    """One input record, not yet parsed: reading a file never fails on a bad row, parsing
    reports it (a `BadRow`) and the rest of the file is still scored."""

    row: int  # 0-based line (or item) number: a bad row's address
    lines: tuple[str, ...]  # as the file holds them: one JSON line, or a text item's lines
    layout: str = "jsonl"  # how to read `lines`: "jsonl" or a task's own text layout
    extra: dict[str, str] = field(default_factory=dict)  # fields kept outside the file (PIQA's labels)

    @property
    def text(self) -> str:
        """The record as a person reads it (errors.parquet shows this for a bad row)."""
        return "\n".join(self.lines)


@dataclass
class Instance:
    """One evaluation item, already rendered the way lm-evaluation-harness renders it.

    Multiple choice: option i is scored as log P(continuations[i] | contexts[i]). Most tasks
    have one shared context (len(contexts) == 1); WinoGrande-style "partial scoring" has one
    context per option and a shared continuation. Generation: greedy decode from contexts[0].

    A chat model reads the same instance through its chat template (`scoring.encode.chat_instance`):
    each context (or `messages`, when the data was a conversation) becomes the user's turn, and
    the continuations lose their `delimiter`, as lm-eval's `--apply_chat_template` renders them.
    """

    id: str
    task: str
    kind: Literal["mc", "gen"]
    contexts: list[str]
    continuations: list[str] = field(default_factory=list)  # mc: one per option (delimiter included)
    choice_chars: list[int] = field(default_factory=list)  # mc: len() of each option's text (acc_norm)
    label: int | None = None  # mc: gold option index
    reference: str = ""  # gold option index as text, or gold answer text
    stop: list[str] = field(default_factory=list)  # gen: stop strings
    max_new_tokens: int = 0  # gen: token limit
    delimiter: str = ""  # the target delimiter (mc: continuations start with it)
    messages: list[dict[str, str]] | None = None  # gen: the conversation before the answer, if any
    doc: dict[str, Any] | None = None  # the task's own document, for tasks that score with it

    def context_for(self, option: int) -> str:
        return self.contexts[0] if len(self.contexts) == 1 else self.contexts[option]


class Task(ABC):
    """A task = reading its published files + rendering prompts + scoring an output."""

    name: str
    kind: Literal["mc", "gen"]
    metric: str  # "acc" (mc), "exact" (gen EM), "rouge1", ...
    default_path: str | None = None  # relative to a data root such as ../shared/data
    training_path: str | None = None  # the training split's file there, where the data root has one

    @abstractmethod
    def records(self, path: str) -> Iterator[Record]:
        """The file's records in file order, unparsed."""

    @abstractmethod
    def parse(self, record: Record) -> Instance:
        """Turn one record into an Instance; raise BadRow with the reason if it cannot."""

    def score_generation(self, inst: Instance, text: str) -> tuple[bool | None, float, str]:
        """(correct, score, prediction) of one generated text; generative tasks override."""
        raise MuscleError(f"task {self.name} is {self.kind}, it does not score generations")

    def training_pair(self, inst: Instance) -> tuple[str | list[dict[str, str]], str]:
        """(prompt, completion) for adapter training on this task's gold answers; the prompt is
        the conversation itself when the data was one (`Instance.messages`)."""
        if self.kind == "mc":
            assert inst.label is not None
            return inst.context_for(inst.label), inst.continuations[inst.label]
        return inst.messages or inst.contexts[0], inst.reference


_REGISTRY: dict[str, type[Task]] = {}
_FAMILIES: dict[str, Callable[..., Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: a new task is one module in muscle_ray/tasks/ that registers itself."""
    _REGISTRY[cls.name] = cls
    return cls


def register_family(prefix: str):
    """Decorator for a factory of tasks named `PREFIX:NAME` (`lmeval:arc_easy`): a family of
    tasks defined elsewhere, built on demand instead of listed."""

    def decorate(factory: Callable[..., Task]) -> Callable[..., Task]:
        _FAMILIES[prefix] = factory
        return factory

    return decorate


def get_task(name: str, **options) -> Task:
    """A configured task by name (importing any muscle_ray.tasks module has registered the built-ins)."""
    prefix, sep, member = name.partition(":")
    if sep and prefix in _FAMILIES:
        return _FAMILIES[prefix](member, **options)
    if name not in _REGISTRY:
        families = "".join(f", {p}:<task>" for p in sorted(_FAMILIES))
        raise MuscleError(f"unknown task '{name}'; known tasks: {', '.join(sorted(_REGISTRY))}{families}")
    return _REGISTRY[name](**options)


def task_names() -> list[str]:
    return sorted(_REGISTRY)


__all__ = ["BadRow", "Instance", "Record", "Task", "get_task", "register", "register_family", "task_names"]
