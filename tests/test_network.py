"""The private local Ray that `muscle` starts stays off the network: every TCP socket that any of
its processes (GCS, raylet, workers, agents, the dashboard, the metrics export, this driver)
listens on is a loopback address.

Slow: starts a local Ray the way the commands do (`runtime.init_ray()`).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.slow


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how a dual-stack socket shows 127.0.0.1
    return (mapped or ip).is_loopback


def ray_processes(session_dir: str) -> list[psutil.Process]:
    """This driver and every process of its Ray session: the driver's children started with the
    session dir on their command line (GCS, raylet, agents, ...) and all of theirs (workers)."""
    me = psutil.Process()
    roots = [p for p in me.children() if any(session_dir in a for a in _cmdline(p))]
    return [me, *roots, *(c for r in roots for c in r.children(recursive=True))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def listening(procs: list[psutil.Process]) -> list[tuple[str, int, str, int]]:
    """(process name, pid, host, port) for every listening TCP socket of `procs`."""
    out = []
    for p in procs:
        try:
            name, conns = p.name(), p.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        out += [(name, p.pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


JOIN = """import ray
from muscle_ray.runtime import init_ray
init_ray()
print(ray._private.worker._global_node.node_ip_address, ray.get(ray.remote(lambda: 2).remote()))
"""


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1"]))


def test_local_ray_listens_on_loopback_only():
    import ray
    from ray._private import ray_constants

    from muscle_ray import runtime

    ray.shutdown()  # this test starts its own
    cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
    runtime.init_ray(num_cpus=2)
    try:

        @ray.remote
        def pid() -> int:
            return os.getpid()

        @ray.remote
        class Actor:
            def pid(self) -> int:
                return os.getpid()

        actor = Actor.remote()
        pids = {ray.get(pid.remote()), ray.get(actor.pid.remote())}
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        procs = ray_processes(session_dir)
        names = {p.name() for p in procs}
        assert {"gcs_server", "raylet"} <= names, names
        assert pids <= {p.pid for p in procs}, "the workers are not among the processes checked"

        sockets = listening(procs)
        assert {n for n, *_ in sockets} >= {"gcs_server", "raylet"}, sockets
        assert pids & {pid for _, pid, *_ in sockets}, "no worker's gRPC server seen"
        exposed = [s for s in sockets if not is_loopback(s[2])]
        assert not exposed, f"listening beyond loopback (process, pid, host, port): {exposed}"
        assert ray._private.worker._global_node.node_ip_address == "127.0.0.1"

        # a second driver joins it the way `muscle score` does under RAY_ADDRESS (a killed run's
        # rerun in the tests): Ray would dial the machine's external address for 127.0.0.1
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        joined = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=180)
        assert joined.returncode == 0 and joined.stdout.split() == ["127.0.0.1", "2"], joined.stderr[-2000:]
    finally:
        ray.shutdown()
    assert ray_constants.ENABLE_RAY_CLUSTER == cluster_switch  # a later init_ray(address=...) joins a cluster
