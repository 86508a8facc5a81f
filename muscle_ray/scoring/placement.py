"""How big a scoring pool is when the config leaves it open (`workers`, `cpus_per_worker`,
`gpus_per_worker` None): from what Ray has, so a default `muscle score` fills the machine.

`place` is the rule, a pure function of the config and a `Resources` snapshot (tested without
Ray); `resolve_placement` reads the snapshot from the running Ray and fills the config. Values
the user gave always win; the others are derived around them.

* Local Ray (started by this run: one node, no autoscaler), no GPU: one actor per CPU, one torch
  thread each. Measured on this project's 2-CPU machine, shared (load average 4-6), HFScorer
  on SmolLM2-135M and 200 HellaSwag items: 2 processes x 1 thread (100 items each) 90 s and
  64 s wall, 1 process x 2 threads 145 s and 245 s. Threads contend with every other process
  for the cores at each op's barrier; processes do not wait for each other, and they also
  overlap the Python side (encoding, packing). Fewer actors, with more threads each, when
  Ray's memory cannot hold that many model copies.
* Each CPU actor asks for its share of the CPUs less a reserve (`reserve_cpus`), so Ray Data's
  input reads (0.25 CPU each) always find room: with every CPU taken the pool waits forever.
* GPUs: one actor per GPU; vLLM: one per `tensor_parallel_size` GPUs. HF with
  `device_map: cpu` stays a CPU pool.
* A cluster (joined through RAY_ADDRESS, more than one node, or an autoscaler): the pool
  autoscales from 1 actor to as many as the cluster holds at its largest (the autoscaler's
  max resources when it has them, else what the cluster has now).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from muscle_ray.errors import MuscleError
from muscle_ray.scoring.config import ScoreConfig

GiB = 1 << 30
READ_CPUS = 0.25  # what one of the scoring job's input reads asks Ray for
RUNTIME_BYTES = GiB // 2  # Python + torch + transformers in one actor, beside the weights
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Resources:
    """What Ray has, as `place` needs it. The node figures are the largest node's."""

    cpus: float  # CPUs in the cluster now
    gpus: float = 0.0
    node_cpus: float | None = None  # None: `cpus` (one node)
    node_memory: float = 0.0  # bytes Ray lets tasks and actors use on that node; 0: unknown
    nodes: int = 1
    joined: bool = False  # this run joined a running Ray (RAY_ADDRESS) rather than starting one
    max_cpus: float | None = None  # the autoscaler's ceiling, when the cluster has one
    max_gpus: float | None = None

    @property
    def cluster(self) -> bool:
        return self.joined or self.nodes > 1 or self.max_cpus is not None or self.max_gpus is not None

    @property
    def per_node_cpus(self) -> float:
        return self.node_cpus if self.node_cpus is not None else self.cpus

    def describe(self) -> str:
        cpus, gpus = _count(self.cpus, "CPU"), _count(self.gpus, "GPU") if self.gpus else "no GPU"
        if not self.cluster:
            return f"{cpus}, {gpus}"
        where = "joined " * self.joined + f"cluster of {_count(self.nodes, 'node')}"
        ceiling = [_count(v, k) for v, k in ((self.max_cpus, "CPU"), (self.max_gpus, "GPU")) if v is not None]
        return f"{where}, {cpus}, {gpus}" + (f", autoscaler max {' '.join(ceiling)}" if ceiling else "")


@dataclass(frozen=True)
class Placement:
    workers: tuple[int, int]
    cpus_per_worker: float
    gpus_per_worker: float
    why: str  # what was derived, from what

    @property
    def threads(self) -> int:
        return torch_threads(self.cpus_per_worker)

    def describe(self) -> str:
        lo, hi = self.workers
        actors = f"{lo} actor" + "s" * (lo > 1) if lo == hi else f"{lo}..{hi} actors (autoscaling)"
        gpus = f"{_count(self.gpus_per_worker, 'GPU')} + " if self.gpus_per_worker else ""
        each = f"{gpus}{self.cpus_per_worker:g} CPU, {_count(self.threads, 'thread')}"
        return f"pool: {actors} x {each} ({self.why})"


def torch_threads(cpus_per_worker: float) -> int:
    """Torch threads per scoring actor: the CPUs it holds, rounded, at least one."""
    return max(1, round(cpus_per_worker))


def _count(n: float, what: str) -> str:
    return f"{n:g} {what}" + "s" * (n != 1)


def reserve_cpus(node_cpus: float) -> float:
    """CPUs a CPU pool leaves free on a node: two input reads' worth, or 5% of a big node."""
    return max(2 * READ_CPUS, 0.05 * node_cpus)


def wants_gpus(cfg: ScoreConfig, res: Resources) -> float:
    """GPUs per actor that the backend and its options need, when GPUs exist (0: a CPU pool)."""
    opts = cfg.backend_options
    if cfg.backend == "vllm":
        tp = int(opts.get("tensor_parallel_size", 1))
        return float(tp) if (res.max_gpus or res.gpus) else 0.0
    on_cpu = str(opts.get("device_map", "")).startswith("cpu")
    return 1.0 if (res.max_gpus or res.gpus) and not on_cpu else 0.0


def place(cfg: ScoreConfig, res: Resources, actor_bytes: float | None = None) -> Placement:
    """The pool for `cfg` on `res`; `actor_bytes`: one actor's memory (weights + runtime), which
    caps how many CPU actors share a node. Fields set in `cfg` are kept as they are."""
    auto: list[str] = []
    gpus = cfg.gpus_per_worker
    if gpus is None:
        gpus = wants_gpus(cfg, res)
        auto.append("gpus")
    node = res.per_node_cpus
    usable = max(node - reserve_cpus(node), min(node, READ_CPUS))  # a tiny node still gets an actor
    if gpus > 0:
        most = max(1, math.floor((res.max_gpus if res.cluster and res.max_gpus else res.gpus) / gpus))
        per_node = 1 if res.cluster else most  # the actors that share one node's CPUs
    elif cfg.backend == "vllm":
        per_node = 1  # vLLM on CPU runs its own threads: one engine per node
        most = _nodes(res)
    else:
        per_node = max(1, math.floor(node))  # one actor per CPU (measured, see above)
        if actor_bytes and res.node_memory:
            per_node = max(1, min(per_node, math.floor(res.node_memory / actor_bytes)))
        if cfg.cpus_per_worker is not None:  # as many of the given size as fit
            per_node = max(1, min(per_node, math.floor(usable / cfg.cpus_per_worker)))
        most = per_node * _nodes(res)
    workers = cfg.workers
    if workers is None:
        workers = (1, most) if res.cluster else (most, most)
        auto.append("workers")
    cpus = cfg.cpus_per_worker
    if cpus is None:
        cpus = usable / min(workers[1], per_node) if res.cluster else usable / workers[1]
        cpus = min(cpus, 1.0) if gpus > 0 else cpus  # a GPU actor's CPU work is one thread's
        cpus = max(0.01, math.floor(cpus * 100) / 100)  # Ray counts in 1/10000s; keep it readable
        auto.append("cpus")
    if not auto:
        why = "as configured"
    else:
        why = ("auto" if len(auto) == 3 else f"auto {', '.join(auto)}") + f": {res.describe()}"
    return Placement((workers[0], workers[1]), cpus, gpus, why)


def starves_reads(p: Placement, res: Resources) -> bool:
    """Whether a local pool at its largest leaves Ray Data's input reads no CPU: they would wait
    for the actors, which wait for them."""
    return not res.cluster and p.workers[1] * p.cpus_per_worker > res.cpus - READ_CPUS


def _nodes(res: Resources) -> int:
    """How many nodes of the largest kind the cluster holds at most (1 on a local Ray)."""
    if not res.cluster:
        return 1
    node = max(res.per_node_cpus, 1.0)
    return max(res.nodes, math.ceil((res.max_cpus or res.cpus) / node))


# -- the impure half: Ray, files ---------------------------------------------------------------


def ray_resources() -> Resources:
    """The running Ray's resources (the driver has called `init_ray`)."""
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")] or [total]
    biggest = max(nodes, key=lambda r: (r.get("CPU", 0), r.get("memory", 0)))
    maxes = _autoscaler_max()
    return Resources(
        cpus=float(total.get("CPU", 0)),
        gpus=float(total.get("GPU", 0)),
        node_cpus=float(biggest.get("CPU", 0)),
        node_memory=float(biggest.get("memory", 0)),
        nodes=len(nodes),
        joined=bool(os.environ.get("RAY_ADDRESS")),
        max_cpus=float(maxes["CPU"]) if maxes and maxes.get("CPU") else None,
        max_gpus=float(maxes["GPU"]) if maxes and maxes.get("GPU") else None,
    )


def _autoscaler_max() -> dict | None:
    """The autoscaler's ceiling per resource (from the cluster config it publishes; None on a
    Ray without an autoscaler). A private Ray API: any failure means "unknown"."""
    try:
        from ray._private import state

        return state.state.get_max_resources_from_cluster_config()
    except Exception:
        return None


def weight_elements(model_dir: str) -> int:
    """Parameters in a model directory's *.safetensors files, from their headers only."""
    n = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        n += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return n


def actor_bytes(cfg: ScoreConfig) -> float | None:
    """One CPU actor's memory: the largest base's weights at the dtype it loads (float32 on CPU
    unless `backend_options.dtype` says otherwise) plus the runtime; None when unreadable."""
    width = DTYPE_BYTES.get(str(cfg.backend_options.get("dtype")), 4)
    try:
        params = max(weight_elements(v.model_version().base) for v in cfg.versions)
    except (OSError, ValueError, KeyError, struct.error, MuscleError):
        return None
    return params * width + RUNTIME_BYTES if params else None


def resolve_placement(cfg: ScoreConfig, log=print) -> ScoreConfig:
    """`cfg` with its unset pool fields filled from the running Ray (see the module's rules);
    logs one line saying what the pool is and why."""
    res = ray_resources()
    plan = place(cfg, res, actor_bytes(cfg))
    log(plan.describe())
    if starves_reads(plan, res):
        log(
            f"warning: the pool asks for {plan.workers[1] * plan.cpus_per_worker:g} of {res.cpus:g} CPUs, "
            f"leaving less than the {READ_CPUS} CPU an input read needs: the run may wait forever "
            "(leave cpus_per_worker unset, or lower it)"
        )
    fields = dict(workers=plan.workers, cpus_per_worker=plan.cpus_per_worker, gpus_per_worker=plan.gpus_per_worker)
    return cfg.model_copy(update=fields)
