"""Starting or joining Ray the same way in every job, test and recipe."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, num_cpus: float | None = None, **kwargs) -> None:
    """Join the cluster named by `address` / RAY_ADDRESS, else start a private local Ray.

    A local default listens on loopback only (Ray otherwise binds the machine's external
    address) and skips the dashboard so it starts quickly.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=kwargs.pop("runtime_env", env), log_to_driver=True, **kwargs)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=kwargs.pop("runtime_env", env),
        configure_logging=True,
        logging_level="WARNING",
        **kwargs,
    )
