"""`serve run serve.app:app` (from the repository root): the app of serve/config.yaml, for tools
that want an import path; `serve run serve/config.yaml` and `muscle serve` read the same file."""

from pathlib import Path

from muscle_ray.serving.app import build
from muscle_ray.serving.config import read_serve_file

_cfg, _opts = read_serve_file(Path(__file__).with_name("config.yaml"))
app = build(_cfg, deployments=_opts["deployments"])
