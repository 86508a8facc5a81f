"""`muscle serve`: host the old, new and compat models behind the OpenAI-compatible gateway.

Reads the same Ray Serve config file as `serve run` (default `serve/config.yaml`); `--set`
overrides the application's `args:` (e.g. `--set limits.max_tokens=64`). Applies the file's
deployment options (autoscaling, CPUs) and http_options, starts or joins Ray through
`runtime.init_ray` (loopback only when local) and blocks until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal

from muscle_ray.cli.options import add_config_arguments, overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, default="serve/config.yaml", what="Ray Serve config file")
    p.add_argument("--host", help="bind address (default: the file's http_options.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the file's http_options.port, else 8000)")
    p.add_argument(
        "--shadow", action="store_true", default=None, help="turn shadow mode on (new/compat requests also go to old)"
    )
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--num-cpus", type=float, help="CPUs of a private local Ray (default: all)")


def run(args: argparse.Namespace) -> int:
    from muscle_ray.serving.config import read_serve_file

    cfg, opts = read_serve_file(args.config, overrides(args, {"shadow.enabled": args.shadow}))

    from muscle_ray.serving.app import build

    app = build(cfg, deployments=opts["deployments"])  # MuscleError (exit 2) before Ray starts
    http = {"host": "127.0.0.1", "port": 8000, **opts["http_options"]}
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})

    from ray import serve

    from muscle_ray.runtime import init_ray

    def stop(signum, frame):  # SIGTERM (service managers) shuts down like Ctrl-C: shadow rows are flushed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    init_ray(address=args.address, num_cpus=args.num_cpus)
    serve.start(http_options=http)
    print(f"muscle serve: http://{http['host']}:{http['port']} (Ctrl-C stops)", flush=True)
    try:
        serve.run(app, name=opts["name"], route_prefix=opts["route_prefix"], blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
