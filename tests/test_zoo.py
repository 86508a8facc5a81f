"""The zoo builds loadable HF bases and task files the generic tasks read, and caches by config."""

import json

from muscle_ray.models import ModelVersion, check_same_tokenizer, load_model
from muscle_ray.tasks import get_task
from muscle_ray.zoo import world
from muscle_ray.zoo.build import BaseConfig, TaskSizes, ZooConfig, build_zoo

MICRO = ZooConfig(
    v1=BaseConfig(steps=5, corpus_docs=50, seed=1),
    v2=BaseConfig(steps=8, corpus_docs=60, seed=2, num_hidden_layers=3),
    sizes=TaskSizes(train=20, limit=10),
)


def test_zoo_builds_caches_and_rebuilds(tmp_path):
    out = build_zoo(tmp_path / "zoo", MICRO, log=lambda m: None)
    stamp = json.loads((out / "zoo.json").read_text())
    v1, v2 = ModelVersion(str(out / "v1"), name="v1"), ModelVersion(str(out / "v2"), name="v2")
    check_same_tokenizer([v1, v2])
    assert load_model(v2, device="cpu").config.num_hidden_layers == 3

    logs = []
    build_zoo(out, MICRO, log=logs.append)
    assert logs and "reusing" in logs[0]
    assert json.loads((out / "zoo.json").read_text())["key"] == stamp["key"]

    changed = MICRO.model_copy(update={"data_seed": 7})
    build_zoo(out, changed, log=lambda m: None)
    assert json.loads((out / "zoo.json").read_text())["key"] == changed.key() != stamp["key"]


def test_zoo_task_files_parse_with_generic_tasks(tmp_path):
    out = build_zoo(tmp_path / "zoo", MICRO, log=lambda m: None)
    mc = get_task("mc_jsonl")
    insts = [mc.parse(rec) for rec in mc.records(str(out / "data/home_mc/test.jsonl"))]
    assert len(insts) == 10 and all(len(i.continuations) == 4 for i in insts)
    assert all(i.continuations[i.label].strip() in world.CITIES for i in insts)
    gen = get_task("gen_jsonl", metric="rouge1", stop=["."], max_new_tokens=16)
    inst = gen.parse(next(gen.records(str(out / "data/trip_rouge/test.jsonl"))))
    _, score, _ = gen.score_generation(inst, " " + inst.reference)
    assert score == 1.0
    pairs = [json.loads(line) for line in open(out / "data/pet_em/train_pairs.jsonl")]
    test_prompts = {json.loads(line)["prompt"] for line in open(out / "data/pet_em/test.jsonl")}
    assert len(pairs) == 20 and not test_prompts & {p["prompt"] for p in pairs}
