"""The console: stage lines on the terminal, everything else the process (and its children and
Ray's workers) prints in the run's log, bars on a terminal only, one line for an error.

Each case runs a small program in its own process, as a command would: the console changes
the process's file descriptors, which pytest's own capture also uses.
"""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

PRELUDE = """
import os, subprocess, sys, time
from muscle_ray import console
from muscle_ray.console import Console
from muscle_ray.errors import MuscleError
run_dir = sys.argv[1]
"""


def _run(body: str, run_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=300, **kwargs
    )


CHATTER = """
    print("library chatter on stdout")
    print("a warning on stderr", file=sys.stderr)
    os.write(2, b"C-level stderr\\n")
    subprocess.run(["echo", "a child process"])
"""


def test_the_terminal_gets_stage_lines_and_the_log_gets_everything(tmp_path):
    res = _run(
        f"""
    with Console(os.path.join(run_dir, "logs")) as con:
        {textwrap.indent(textwrap.dedent(CHATTER), " " * 8).strip()}
        with con.stage("scoring", total=3, unit="rows") as stage:
            stage.advance(3)
        con.line("the verdict table")
    print("after the console")
    """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("scoring ") and "3/3 rows in 00:0" in lines[0], lines
    assert lines[1:] == ["the verdict table", "after the console"]
    assert res.stderr == ""  # no bars: stderr is not a terminal
    log = (tmp_path / "logs" / "ray.log").read_text()
    for text in (
        "library chatter on stdout",
        "a warning on stderr",
        "C-level stderr",
        "a child process",
        "the verdict table",
    ):
        assert text in log, text
    assert "after the console" not in log


def test_verbose_shows_the_log_live_as_well(tmp_path):
    res = _run(
        f"""
    with Console(os.path.join(run_dir, "logs"), verbose=True) as con:
        {textwrap.indent(textwrap.dedent(CHATTER), " " * 8).strip()}
        time.sleep(0.5)                     # the copy to the terminal runs in a thread
    """,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    for text in ("library chatter on stdout", "a warning on stderr", "C-level stderr", "a child process"):
        assert text in res.stderr and text in (tmp_path / "logs" / "ray.log").read_text(), text


def test_a_terminal_gets_a_live_bar_per_stage(tmp_path):
    """On a terminal (a pty here) a running stage draws a bar; its last line replaces it."""
    code = PRELUDE + textwrap.dedent("""
    with Console(os.path.join(run_dir, "logs")) as con:
        with con.stage("task adapters", total=4) as stage:
            for _ in range(4):
                time.sleep(0.4)
                stage.advance()
    """)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    text = seen.decode("utf-8", "replace")
    assert "task adapters" in text and "/4 steps [" in text, text  # the live bar: count, elapsed, rate
    assert "\r" in text  # redrawn in place
    assert "4/4 steps in 00:0" in text.splitlines()[-1], text  # the stage's line stays


def test_an_error_ends_in_one_line_naming_the_log(tmp_path):
    res = _run(
        """
    with console.setup(run_dir):
        print("what led up to it")
        raise RuntimeError("disk on fire\\nmore detail")
    """,
        tmp_path,
    )
    log_path = tmp_path / "logs" / "ray.log"
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"error: RuntimeError: disk on fire (traceback and Ray's output: {log_path})"], (
        res.stderr
    )
    log = log_path.read_text()
    assert "what led up to it" in log and "Traceback" in log and "more detail" in log

    res = _run(
        """
    try:
        with console.setup(run_dir):
            raise MuscleError("demo.yaml: field 'seeds': bad")
    except MuscleError as e:
        print(e)
    """,
        tmp_path,
    )
    assert res.stdout.strip() == f"demo.yaml: field 'seeds': bad (log: {log_path})", res


@pytest.mark.slow
def test_ray_workers_report_progress_and_their_output_lands_in_the_log(tmp_path):
    """A Ray task reports steps to the stage's bar through the board; its prints reach the log
    (Ray forwards them to the driver); its error surfaces as its own one line."""
    res = _run(
        """
    def train(progress, steps):
        for step in range(1, steps + 1):
            time.sleep(0.05)
            progress(step, steps)
        print("worker finished its steps", flush=True)

    def fail():
        raise ValueError("bad shard 3\\ndetails")

    with console.setup(run_dir) as con:
        import ray                          # after the console: Ray reads its log settings on import

        from muscle_ray.runtime import init_ray

        init_ray(num_cpus=2)
        with con.stage("adapters", total=None) as stage:
            ray.get([ray.remote(num_cpus=0.5)(train).remote(stage.reporter(part), 30) for part in ("v1", "v2")])
        ray.get(ray.remote(fail).remote())
    """,
        tmp_path,
    )
    assert res.returncode == 1, res.stderr
    (line,) = res.stdout.splitlines()
    assert line.startswith("adapters ") and "60/60 steps" in line, line  # totals came from the workers
    assert res.stderr.splitlines() == [
        f"error: ValueError: bad shard 3 (traceback and Ray's output: {tmp_path / 'logs' / 'ray.log'})"
    ]
    log = (tmp_path / "logs" / "ray.log").read_text()
    assert log.count("worker finished its steps") == 2 and "details" in log
    assert (tmp_path / "logs" / "ray-session").is_symlink()  # Ray's own logs of the session


@pytest.mark.slow
def test_a_user_error_inside_ray_data_is_still_one_user_error_line(tmp_path):
    """Ray keeps an error raised in a Ray Data UDF only as traceback text: the line still names
    it, and a MuscleError stays a MuscleError (exit code 2 in the CLI)."""
    res = _run(
        """
    def check(batch):
        raise MuscleError("data.jsonl: row 3: field 'prompt' is missing")

    try:
        with console.setup(run_dir):
            import ray.data

            ray.data.range(8).map_batches(check).materialize()
    except MuscleError as e:
        print(e)
    """,
        tmp_path,
    )
    assert res.stdout.strip() == (
        f"data.jsonl: row 3: field 'prompt' is missing (log: {tmp_path / 'logs' / 'ray.log'})"
    ), res
