"""Starting or joining Ray the same way in every job, test and recipe."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

_session_dir: str | None = None


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster named by `address` / RAY_ADDRESS, else start a private local Ray.

    A local default listens on loopback only (Ray otherwise binds the machine's external
    address) and skips the dashboard so it starts quickly.
    """
    global _session_dir
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        context = ray.init(address=address, runtime_env=kwargs.pop("runtime_env", env), log_to_driver=True, **kwargs)
    else:
        context = ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env=kwargs.pop("runtime_env", env),
            configure_logging=True,
            logging_level=logging.WARNING,
            **kwargs,
        )
    _session_dir = getattr(context, "address_info", {}).get("session_dir")   # none through ray://


def session_logs() -> Path | None:
    """This machine's folder of Ray's own logs for the current session (raylet, GCS, every
    worker's stdout and stderr), when it is on this machine."""
    if _session_dir is None or not (Path(_session_dir) / "logs").is_dir():
        return None
    return Path(_session_dir) / "logs"
