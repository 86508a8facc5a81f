"""`serve run serve.app:app` (from the repository root): the app with serve/config.yaml's args.

The config file itself is the usual entry point (`serve run serve/config.yaml`, which also
applies its deployment options); this module is for tools that want an import path.
"""

from pathlib import Path

from muscle_ray.serving.app import build
from muscle_ray.serving.config import read_serve_file

_args, _opts = read_serve_file(Path(__file__).with_name("config.yaml"))
app = build(_args, deployments=_opts["deployments"])
