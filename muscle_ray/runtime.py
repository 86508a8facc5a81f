"""Starting or joining Ray the same way in every job, test and recipe."""

from __future__ import annotations

import ipaddress
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import ray

_session_dir: str | None = None


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster named by `address` / RAY_ADDRESS, else start a private local Ray.

    A local default listens on loopback only (see `_loopback_only`) and skips the dashboard
    so it starts quickly.
    """
    global _session_dir
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        # a loopback address is such a private Ray: Ray would swap it for the machine's address too
        with _loopback_only() if _is_loopback(address) else nullcontext():
            context = ray.init(
                address=address, runtime_env=kwargs.pop("runtime_env", env), log_to_driver=True, **kwargs
            )
    else:
        with _loopback_only():
            context = ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                runtime_env=kwargs.pop("runtime_env", env),
                configure_logging=True,
                logging_level=logging.WARNING,
                **kwargs,
            )
    _session_dir = getattr(context, "address_info", {}).get("session_dir")  # none through ray://


def _is_loopback(address: str) -> bool:
    """Whether a Ray address (host:port, maybe with a scheme) names this machine's loopback."""
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _loopback_only():
    """Keep a private local Ray off the network: every process it starts listens on 127.0.0.1.

    Ray binds its gRPC servers (GCS, raylet, object manager, workers), its agents and the
    metrics export to the node's address, and `ray.init` replaces a 127.0.0.1 node address by
    the machine's external one unless Ray runs as a one-machine cluster -- its own switch,
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which is read once when Ray is imported. So the
    switch is set for the processes `ray.init` spawns (they inherit the environment) and for
    this one, and put back afterwards: a later `init_ray(address=...)` joins a real cluster.
    A driver joining a loopback address needs the switch as well, or Ray would dial the
    machine's external address, where nothing listens.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved, saved_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(name)
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def session_logs() -> Path | None:
    """This machine's folder of Ray's own logs for the current session (raylet, GCS, every
    worker's stdout and stderr), when it is on this machine."""
    if _session_dir is None or not (Path(_session_dir) / "logs").is_dir():
        return None
    return Path(_session_dir) / "logs"


def run_here(fn, *args, num_cpus: float = 0.25):
    """`fn(*args)` as a Ray task pinned to the driver's node (it reads or writes the driver's
    local files), asking a fraction of a CPU so it never waits behind a pool that fills the
    node. A MuscleError raised in it comes back as itself, one line."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from muscle_ray.errors import MuscleError

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=num_cpus)(fn).options(scheduling_strategy=here)
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, MuscleError):
            raise MuscleError(str(e.cause)) from e
        raise


READ_MEMORY = 256 * 1024 * 1024  # what a task reading local slices asks Ray for (its worker's RSS)


def read_slices(batch: dict):
    """(file, start, stop) slices of local Parquet files -> one Arrow table of their rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = zip(batch["file"], batch["start"], batch["stop"])
    return pa.concat_tables([pq.read_table(f).slice(a, b - a) for f, a, b in parts])


def read_here(pieces: list[dict], fn, memory: int = READ_MEMORY):
    """A Dataset of `fn` over (file, start, stop) pieces of this node's files, one block per
    piece, in order, read by tasks on the driver's node.

    Not `ray.data.read_parquet`: its tasks may run on any node of a cluster, where the files
    are not, and its `local://` paths are deprecated. The read asks for memory and a fraction
    of a CPU, so Ray Data never fuses it with a later actor pool (which would then inherit
    this node) and it never waits behind a pool that fills the node."""
    import ray.data

    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    return ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        fn, batch_size=1, batch_format="numpy", num_cpus=0.25, memory=memory, label_selector=here
    )
