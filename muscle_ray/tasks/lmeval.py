"""`lmeval:<task>`: any lm-evaluation-harness (0.4.13) task, scored by muscle's backends.

lm-eval builds the task from its own YAML: documents, few-shot examples, prompts and requests
exactly as `simple_evaluate` builds them (`fewshot_context`, then `construct_requests`, with
the few-shot seed 1234). muscle's scorers answer the requests. A generation is scored by
lm-eval's own filters and `process_results`; a multiple-choice question as lm-eval's
multiple_choice tasks score one (acc: the highest summed log-likelihood; acc_norm: the
highest per character). Results rows: id = lm-eval's doc_id, correct/score from `acc` or
`exact_match` (another per-document metric with the `metric` option), prediction = the chosen
option or the filtered generation, reference = the gold index or doc_to_target.

Data is read from local files only (lm-eval's tasks would download from the Hugging Face hub):

* a file (`--data test.jsonl`, .json, .parquet or .csv) holds the task's evaluation split, in
  the columns its YAML reads (the hub dataset's); few-shot examples come from another file,
  the `fewshot_data` option, unless the task draws them from its evaluation split;
* a directory (`--data DIR`, or `--data-root ROOT` meaning ROOT/<the task's dataset_path>, e.g.
  ROOT/allenai/ai2_arc) is a local copy of the task's hub dataset repository, read with the
  task's own dataset name and splits.

Options: `num_fewshot` (default: the task's), `fewshot_data`, `fewshot_seed` (1234),
`max_new_tokens` (default: the task's max_gen_toks), `filter` (default: the task's first),
`metric`. Generation is greedy whatever the task's generation_kwargs say. Multiple-choice and
generate_until tasks are scored; groups, tags, other output types and tasks defined as Python
classes are refused in one line naming them.

Chat models (`chat_template: true`) read each request's context as one user turn, with the
options' target delimiter dropped: what lm-eval's `--apply_chat_template` feeds a chat model
for a task without a description, few-shot examples included in that turn.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.tasks.base import Instance, Record, Task, register_family
from muscle_ray.tasks.common import Options, parse_options

PREFIX = "lmeval"
LAYOUT = "lmeval"  # a record holding one lm-eval document and its requests
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SCORED = ("multiple_choice", "generate_until")
FEWSHOT_SEED = 1234  # simple_evaluate's fewshot_random_seed


class LmEvalOptions(Options):
    num_fewshot: int | None = Field(None, ge=0)
    fewshot_data: str | None = None
    fewshot_seed: int = FEWSHOT_SEED
    max_new_tokens: int | None = Field(None, gt=0)
    filter: str | None = None
    metric: str | None = None


@functools.cache
def task_index() -> dict:
    """lm-eval's index of its tasks (name -> Entry), built once per process: it reads every
    task YAML, so only the driver builds it; actors rebuild a task from its YAML file alone."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def build_task(yaml_path: str | Path, overrides: dict[str, Any]):
    """lm-eval's task from its YAML file, with some config fields replaced (lm-eval's own
    TaskFactory: includes and `!function`s resolved as `TaskManager.load` resolves them)."""
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.tasks._index import TaskIndex

    entry = TaskIndex.entry_from_path(Path(yaml_path))
    return TaskFactory().build(entry, overrides=overrides, registry={})


def _gold(task, doc: dict, choices: list[str]) -> int:
    """The gold option's index, found as lm-eval's multiple_choice process_results finds it."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        if len(gold) != 1:
            raise ValueError(f"{len(gold)} gold answers (lm-eval's multiple targets); muscle scores one")
        gold = gold[0]
    if isinstance(gold, str):
        if gold not in choices:
            raise ValueError(f"gold answer {gold!r} is not one of the choices")
        return choices.index(gold)
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold!r} out of range for {len(choices)} choices")
    return gold


class LmEvalTask(Task):
    """One lm-eval task. Building it is cheap: the index and the data are read on first use, by
    the driver (records, default_path); an actor only parses records and scores generations."""

    Options = LmEvalOptions

    def __init__(self, task: str, **options: Any):
        self.task = task
        self.name = f"{PREFIX}:{task}"
        self.options: LmEvalOptions = parse_options(self.name, LmEvalOptions, options)
        self._config_path: str | None = None  # the task's YAML, learnt from its records
        self._scorer = None  # lm-eval's task, rebuilt here to score generations

    # -- what lm-eval's index says about the task ----------------------------------------------
    @functools.cached_property
    def entry(self):
        from lm_eval.tasks._index import Kind

        entry = task_index().get(self.task)
        if entry is None:
            raise MuscleError(
                f"unknown task '{self.name}': lm-eval {self._version()} has no task '{self.task}' "
                "(`lm-eval ls tasks` lists them)"
            )
        if entry.kind in (Kind.GROUP, Kind.TAG):
            members = (
                entry.tags
                if entry.kind == Kind.TAG
                else [t if isinstance(t, str) else t.get("task", "?") for t in entry.cfg.get("task", [])]
            )
            shown = ", ".join(f"{PREFIX}:{m}" for m in sorted(map(str, members))[:5])
            raise MuscleError(
                f"task {self.name}: an lm-eval group of {len(members)} tasks; score its tasks one "
                f"by one ({shown}{', ...' if len(members) > 5 else ''})"
            )
        if entry.kind != Kind.TASK or entry.yaml_path is None:
            raise MuscleError(f"task {self.name}: defined by lm-eval as a Python class; muscle scores YAML tasks")
        output_type = entry.cfg.get("output_type", "generate_until")
        if output_type not in SCORED:
            raise MuscleError(
                f"task {self.name}: output_type {output_type}; muscle scores lm-eval's {' and '.join(SCORED)} tasks"
            )
        return entry

    @staticmethod
    def _version() -> str:
        from importlib.metadata import version

        return version("lm_eval")

    @property
    def kind(self):
        return "mc" if self.entry.cfg.get("output_type") == "multiple_choice" else "gen"

    @property
    def metric(self):
        return self.options.metric or ("acc" if self.kind == "mc" else "exact_match")

    @property
    def default_path(self):
        """The task's hub dataset (`allenai/ai2_arc`), as a directory under a data root."""
        return self.entry.cfg.get("dataset_path")

    # -- records: lm-eval's documents and requests, built on the driver ---------------------------
    def _data_overrides(self, cfg: dict, path: Path) -> dict[str, Any]:
        """Config fields that point the task at local files instead of the hub."""
        if path.is_dir():
            return {"dataset_path": str(path.resolve())}
        builder = BUILDERS.get(path.suffix)
        if builder is None:
            raise MuscleError(f"{path}: task {self.name} reads a {', '.join(BUILDERS)} file or a dataset directory")
        eval_split = cfg.get("test_split") or cfg.get("validation_split")
        if eval_split is None:
            raise MuscleError(f"task {self.name}: its YAML names no test or validation split to evaluate")
        fewshot = dict(cfg.get("fewshot_config") or {})
        declared = fewshot.get("split") or cfg.get("fewshot_split")
        n = self.options.num_fewshot if self.options.num_fewshot is not None else cfg.get("num_fewshot") or 0
        files = {eval_split: str(path.resolve())}
        training_split = None
        if self.options.fewshot_data:
            source = Path(self.options.fewshot_data)
            if not source.is_file():
                raise MuscleError(f"{source}: no such file (fewshot_data of task {self.name})")
            training_split = declared if declared and declared != eval_split else "fewshot"
            files[training_split] = str(source.resolve())
            fewshot["split"] = training_split
        elif n > 0 and declared != eval_split and not fewshot.get("samples"):
            raise MuscleError(
                f"task {self.name}: num_fewshot={n} takes examples from its "
                f"'{declared or cfg.get('training_split') or 'training'}' split; give the task option "
                "fewshot_data=FILE (or num_fewshot=0)"
            )
        else:
            fewshot["split"] = declared if declared == eval_split else None
        return {
            "dataset_path": builder,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "test_split": eval_split if cfg.get("test_split") else None,
            "validation_split": None if cfg.get("test_split") else eval_split,
            "training_split": training_split,
            "fewshot_split": None,
            "fewshot_config": fewshot,
        }

    def _config_overrides(self, cfg: dict) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.options.num_fewshot is not None:
            out["num_fewshot"] = self.options.num_fewshot
        if self.options.max_new_tokens is not None:
            out["generation_kwargs"] = {
                **(cfg.get("generation_kwargs") or {}),
                "max_gen_toks": self.options.max_new_tokens,
            }
        return out

    def lm_eval_task(self, path: str | Path):
        """lm-eval's task over the local data at `path`, seeded as simple_evaluate seeds it."""
        yaml_path, cfg = self.entry.yaml_path, self.entry.cfg  # the index's cfg has its includes merged
        overrides = {**self._data_overrides(cfg, Path(path)), **self._config_overrides(cfg)}
        try:
            task = build_task(yaml_path, overrides)
        except MuscleError:
            raise
        except Exception as e:  # datasets' and the task's own errors, in one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MuscleError(
                f"task {self.name}: cannot read its data from {path}: {type(e).__name__}: {reason}"
            ) from None
        task.set_fewshot_seed(seed=self.options.fewshot_seed)
        self._check_scoring(task)
        return task

    def _check_scoring(self, task) -> None:
        """The chosen filter and metric exist (refused before any model runs)."""
        names = [f.name for f in task._filters]
        if self.options.filter is not None and self.options.filter not in names:
            raise MuscleError(f"task {self.name}: no filter '{self.options.filter}'; it has {', '.join(names)}")
        metrics = list(task._metric_fn_list)
        if self.options.metric is not None and self.options.metric not in metrics:
            raise MuscleError(f"task {self.name}: no metric '{self.options.metric}'; it has {', '.join(metrics)}")

    def records(self, path: str) -> Iterator[Record]:
        """One record per document, in lm-eval's doc order, holding the document and the
        requests lm-eval would send a model for it (a document that fails becomes a bad row)."""
        task = self.lm_eval_task(path)
        n = 0 if task.config.num_fewshot is None else task.config.num_fewshot
        source = {"config": str(self.entry.yaml_path)}
        for doc_id, doc in task.doc_iterator(rank=0, limit=None, world_size=1):
            item: dict[str, Any] = {"doc_id": doc_id, "doc": doc}
            try:
                ctx = task.fewshot_context(
                    doc,
                    num_fewshot=n,
                    system_instruction=None,
                    apply_chat_template=False,
                    fewshot_as_multiturn=False,
                    chat_template=None,
                    gen_prefix=task.doc_to_prefix(doc),
                )
                requests = task.construct_requests(
                    doc=doc,
                    ctx=ctx,
                    metadata=(task.config.task, doc_id, task.config.repeats),
                    apply_chat_template=False,
                    chat_template=None,
                )
                requests = requests if isinstance(requests, list) else [requests]
                item["requests"] = [list(r.arguments) for r in requests]
                if task.OUTPUT_TYPE == "multiple_choice":
                    item["choices"] = task.doc_to_choice(doc)
                    item["gold"] = _gold(task, doc, item["choices"])
                else:
                    item["target"] = task.doc_to_target(doc)
                item["delimiter"] = task.config.target_delimiter
            except Exception as e:  # the task's own code failed on this document
                item["error"] = f"lm-eval could not build its requests: {type(e).__name__}: {e}"
            yield Record(doc_id, (json.dumps(item, ensure_ascii=False, default=str),), LAYOUT, extra=source)

    # -- parse and score: in the actors, without the index or the data ----------------------------
    def parse(self, record: Record) -> Instance:
        if record.layout != LAYOUT:
            raise BadRow(f"not a record of task {self.name}", record.row)
        self._config_path = self._config_path or record.extra["config"]
        item = json.loads(record.lines[0])
        if "error" in item:
            raise BadRow(item["error"], record.row)
        id, requests = str(item["doc_id"]), item["requests"]
        if "choices" in item:
            choices = item["choices"]
            pairs = requests[: len(choices)]  # any after them are acc_mutual_info's, not scored here
            contexts = [c for c, _ in pairs]
            return Instance(
                id=id,
                task=self.name,
                kind="mc",
                contexts=contexts if len(set(contexts)) > 1 else contexts[:1],
                continuations=[c for _, c in pairs],
                choice_chars=[len(c) for c in choices],
                label=item["gold"],
                reference=str(item["gold"]),
                delimiter=item["delimiter"],
                doc=item["doc"],
            )
        context, kwargs = requests[0]
        until = kwargs.get("until") or []
        target = item["target"]
        return Instance(
            id=id,
            task=self.name,
            kind="gen",
            contexts=[context],
            reference=str(target[0] if isinstance(target, list) and target else target),
            stop=[until] if isinstance(until, str) else list(until),
            max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
            delimiter=item["delimiter"],
            doc=item["doc"],
        )

    def _scoring_task(self, doc: dict):
        """lm-eval's task again, over this one document instead of the data: its filters and
        process_results need the task's config, not its files."""
        if self._scorer is None:
            import datasets

            if self._config_path is None:
                raise MuscleError(f"task {self.name}: scoring a generation needs its record parsed first")
            one = {"test": datasets.Dataset.from_list([doc])}
            self._scorer = build_task(
                self._config_path,
                {
                    "custom_dataset": lambda **_: datasets.DatasetDict(one),
                    "dataset_kwargs": None,
                    "test_split": "test",
                    "validation_split": None,
                    "training_split": None,
                    "fewshot_split": None,
                    "fewshot_config": None,
                    "process_docs": None,
                    "num_fewshot": 0,
                },
            )
        return self._scorer

    def score_generation(self, inst: Instance, text: str) -> tuple[bool | None, float, str]:
        """lm-eval's filter (the task's first, or `filter`), then its process_results."""
        from lm_eval.api.instance import Instance as Request

        assert inst.doc is not None
        task = self._scoring_task(inst.doc)
        ensemble = next(f for f in task._filters if self.options.filter in (None, f.name))
        request = Request(request_type="generate_until", doc=inst.doc, arguments=(inst.contexts[0], {}), idx=0)
        request.resps = [text]
        ensemble.apply([request])
        filtered = request.filtered_resps[ensemble.name]
        metrics = task.process_results(inst.doc, [filtered])
        name = self.options.metric or next((m for m in ("acc", "exact_match") if m in metrics), next(iter(metrics)))
        value = metrics[name]
        if not isinstance(value, (bool, int, float)):
            raise MuscleError(
                f"task {self.name}: metric '{name}' is not a number per document (lm-eval "
                "aggregates it over the corpus); choose another with the option metric="
            )
        correct = bool(value) if name in ("acc", "exact_match") and float(value) in (0.0, 1.0) else None
        return correct, float(value), str(filtered)

    def training_pair(self, inst: Instance) -> tuple[str | list[dict[str, str]], str]:
        """A generative task's answer follows its prompt after the target delimiter, as in
        lm-eval's few-shot examples."""
        if inst.kind == "mc":
            return super().training_pair(inst)
        return inst.contexts[0], inst.delimiter + inst.reference


@register_family(PREFIX)
def lmeval_task(task: str, **options: Any) -> LmEvalTask:
    if not task:
        raise MuscleError(f"task {PREFIX}:: name an lm-eval task after the colon (lmeval:arc_easy)")
    return LmEvalTask(task, **options)
