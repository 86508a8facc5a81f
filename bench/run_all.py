"""`make bench`: run every bench/bench_*.py in turn, one at a time so timings do not compete.

Each benchmark measures its own ratios inside one run and prints a JSON summary on its last
line; this collects those into bench/out/summary.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("bench_*.py"))
    summary, failed = {}, []
    for name in names:
        script = HERE / f"{name.removesuffix('.py')}.py"
        print(f"== {script.name}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        print(proc.stdout, end="", flush=True)
        last = proc.stdout.strip().splitlines()[-1:] or [""]
        try:
            summary[script.stem] = json.loads(last[0])
        except json.JSONDecodeError:
            summary[script.stem] = {"output": last[0]}
        summary[script.stem]["_wall_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode:
            failed.append(script.stem)
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {out / 'summary.json'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
