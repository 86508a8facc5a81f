"""What a person sees while a job runs: one line per stage with a live bar, then the result.

Everything else the process prints (Ray's own messages, the output Ray forwards from train
workers and scoring actors, library warnings) goes to `<run>/logs/ray.log`: the console points
the process's stdout and stderr (file descriptors 1 and 2) at that file and keeps its own
copies of the terminal for the bars and lines. `verbose` copies the log to the terminal live.

Progress from Ray workers reaches the driver through a small actor, the board: a stage hands
`stage.reporter(part)` to remote code, which reports its step count there; the driver reads
the board twice a second and moves the bars. Driver-side work (scored rows) calls
`stage.advance(n)` directly.

    with console.setup("runs/demo", verbose=False) as con:
        with con.stage("task adapters", total=2400) as stage:
            run_training(cfg, progress=stage.reporter("v1"))
        con.line(table)
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from muscle_ray.errors import MuscleError

POLL_S = 0.5
NAME_WIDTH = 40  # "trip_rouge: compat and control adapters"


class ProgressBoard:
    """The driver's view of remote progress: the latest (count, total) of each part."""

    def __init__(self):
        self.counts: dict[str, tuple[int, int | None]] = {}

    def set(self, key: str, n: int, total: int | None) -> None:
        self.counts[key] = (n, total)

    def snapshot(self) -> dict[str, tuple[int, int | None]]:
        return self.counts


class Progress:
    """Reports one part's count to the board from any process in the cluster (picklable).

    Calls are fire-and-forget and sent at most every `every_s` seconds, and always on the last
    step, so a training loop can call it on every step.
    """

    def __init__(self, board, key: str, every_s: float = POLL_S):
        self.board, self.key, self.every_s = board, key, every_s
        self._sent = 0.0

    def __call__(self, n: int, total: int | None = None) -> None:
        now = time.monotonic()
        if now - self._sent >= self.every_s or n == total:
            self.board.set.remote(self.key, int(n), total)
            self._sent = now


class Stage:
    """One line of the console: a name, a count towards a total, a bar while it runs."""

    def __init__(self, console: "Console", key: str, name: str, total: int | None, unit: str):
        self.console, self.key, self.name, self.unit = console, key, name, unit
        self.given_total = total
        self.local = 0  # counted on the driver (advance)
        self.parts: list[str] = []  # board keys counted remotely (reporter)
        self.note = ""  # said after the counts on the stage's last line
        self.started = time.perf_counter()
        self.bar: tqdm | None = None

    def advance(self, n: int = 1) -> None:
        self.local += n

    def reporter(self, part: str) -> Progress:
        """A progress callback for remote code, counted towards this stage."""
        key = f"{self.key}/{part}"
        self.parts.append(key)
        return Progress(self.console.board(), key)

    def counts(self, board: dict) -> tuple[int, int | None]:
        seen = [board[k] for k in self.parts if k in board]
        n = self.local + sum(c for c, _ in seen)
        total = self.given_total
        if total is None and seen and len(seen) == len(self.parts) and all(t for _, t in seen):
            total = sum(t for _, t in seen)
        return n, total

    def summary(self, board: dict) -> str:
        """The stage's last line: what it counted, how long it took, its note."""
        n, total = self.counts(board)
        elapsed = time.perf_counter() - self.started
        words = [f"{self.name:<{NAME_WIDTH}}"]
        if n or total:
            words.append(f"{n}/{total} {self.unit}" if total else f"{n} {self.unit}")
        words.append(f"in {tqdm.format_interval(elapsed)}")
        if n and elapsed > 0:
            words.append(f"({n / elapsed:.1f} {self.unit}/s)")
        if self.note:
            words.append(f"  {self.note}")
        return " ".join(words)


class Console:
    """Stages with live bars and plain lines on the terminal; everything else into `logs/ray.log`.

    `log_dir=None` leaves the process's output where it is (a notebook that wants Ray's output).
    `bars=None` shows bars only on a terminal, and never with `verbose`.
    """

    def __init__(self, log_dir: str | Path | None, verbose: bool = False, bars: bool | None = None):
        self.log_path = Path(log_dir) / "ray.log" if log_dir is not None else None
        self.verbose = verbose
        self.lines: list[str] = []  # every line shown, for callers and tests
        self._bars = bars
        self._stages: list[Stage] = []
        self._started = itertools.count()
        self._board = None
        self._board_counts: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._saved_fds: tuple[int, int] | None = None
        self._saved_streams = (sys.stdout, sys.stderr)
        self._log_fd: int | None = None
        self._tee_thread: threading.Thread | None = None
        self.out, self.err = sys.stdout, sys.stderr

    # --- the terminal and the log --------------------------------------------------------

    def __enter__(self) -> "Console":
        if self.log_path is not None:
            self._redirect(self.log_path)
        if self._bars is None:
            self._bars = not self.verbose and self.err.isatty()
        self._poller = threading.Thread(target=self._poll, name="console-bars", daemon=True)
        self._poller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self._saved_fds is not None:
            self._restore()

    def close(self) -> None:
        """Stop the bars and the progress board (before Ray shuts down)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        if self._board is not None:
            import ray

            if ray.is_initialized():
                ray.kill(self._board)
            self._board = None

    def _redirect(self, path: Path) -> None:
        # Plain text in the file: no colour codes around worker prefixes, no lines folded into
        # "[repeated 5x across cluster]", no Ray Data bars (the stages have their own).
        os.environ.update(RAY_COLOR_PREFIX="0", RAY_DEDUP_LOGS="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fds = (os.dup(1), os.dup(2))
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        self.err = os.fdopen(os.dup(2), "w", buffering=1)
        self._log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        target = self._log_fd
        if self.verbose:  # a pipe, copied to the log and to the terminal as it arrives
            read_end, target = os.pipe()
            self._tee_thread = threading.Thread(
                target=self._tee, args=(read_end, self._log_fd), name="console-tee", daemon=True
            )
            self._tee_thread.start()
        os.dup2(target, 1)
        os.dup2(target, 2)
        if target != self._log_fd:
            os.close(target)
        # Python-level writers too, whatever sys.stdout was (a test's capture, a notebook's).
        self._saved_streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (
            open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False) for fd in (1, 2)
        )

    def _tee(self, read_end: int, log_fd: int) -> None:
        while chunk := os.read(read_end, 65536):
            os.write(log_fd, chunk)
            os.write(self.err.fileno(), chunk)
        os.close(read_end)

    def _restore(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._saved_streams
        assert self._saved_fds is not None
        for fd, saved in zip((1, 2), self._saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved_fds = None
        if self._tee_thread is not None:  # ends once no process holds the pipe (Ray is down)
            self._tee_thread.join(timeout=2)
        if self._tee_thread is None or not self._tee_thread.is_alive():
            assert self._log_fd is not None
            os.close(self._log_fd)
            self._log_fd = None
        self.out.close()
        self.err.close()
        self.out, self.err = self._saved_streams

    def log(self, text: str) -> None:
        """A line in the log file only (on stderr when there is none)."""
        if self._log_fd is None:
            print(text, file=sys.stderr, flush=True)
        else:
            os.write(self._log_fd, (text + "\n").encode())

    def line(self, text: str) -> None:
        """A line on the terminal (above the bars) and in the log."""
        with self._lock:
            self.lines.extend(text.splitlines() or [""])
            with tqdm.external_write_mode(file=self.err):
                # From the first column: a bar closed below others can leave the cursor mid-line.
                self.out.write(("\r" if self._bars else "") + text + "\n")
                self.out.flush()
        if self._log_fd is not None:
            self.log(text)

    # --- stages --------------------------------------------------------------------------

    @contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "steps") -> Iterator[Stage]:
        """A stage of the run: a live bar while it runs, one summary line when it ends."""
        stage = Stage(self, f"stage{next(self._started)}", name, total, unit)
        with self._lock:
            if self._bars:
                stage.bar = tqdm(
                    total=total,
                    desc=f"{name:<{NAME_WIDTH}}",
                    unit=f" {unit}",
                    file=self.err,
                    leave=False,
                    dynamic_ncols=True,
                    bar_format="{desc} |{bar:20}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_noinv_fmt}]",
                )
            self._stages.append(stage)
        try:
            yield stage
        finally:
            self._read_board()
            with self._lock:
                self._stages.remove(stage)
                if stage.bar is not None:
                    stage.bar.close()
            self.line(stage.summary(self._board_counts))

    def board(self):
        """The progress board actor, started on first use (and Ray with it, if it is not yet)."""
        with self._lock:
            if self._board is None:
                import ray

                from muscle_ray.runtime import init_ray

                init_ray()
                self._board = ray.remote(num_cpus=0)(ProgressBoard).remote()
            return self._board

    def _read_board(self) -> None:
        if self._board is None:
            return
        import ray

        try:
            self._board_counts = ray.get(self._board.snapshot.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.log(f"console: progress board not answering ({e})")

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._read_board()
            with self._lock:
                for stage in self._stages:
                    if stage.bar is not None:
                        n, total = stage.counts(self._board_counts)
                        stage.bar.total = total
                        stage.bar.n = n
                        stage.bar.refresh()


@contextmanager
def setup(run_dir: str | Path, verbose: bool = False) -> Iterator[Console]:
    """The console of a command that writes into `run_dir`: its log in `run_dir/logs/ray.log`.

    Ray is shut down before the terminal is given back, so its exit messages stay in the log.
    An error ends in one line naming the log; the traceback goes into the log.
    """
    console = Console(Path(run_dir) / "logs", verbose=verbose)
    try:
        with console:
            console.log(f"$ {' '.join(sys.argv)}")
            try:
                yield console
            except MuscleError:
                raise
            except BaseException:
                traceback.print_exc()  # into the log
                raise
            finally:
                console.close()
                _shutdown_ray(console)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted (log: {console.log_path})") from None
    except Exception as e:
        kind, message = _root(e)
        if kind == MuscleError.__name__:
            raise MuscleError(f"{message} (log: {console.log_path})") from None
        raise SystemExit(f"error: {kind}: {message} (traceback and Ray's output: {console.log_path})") from None


# "module.SomeError: message", a raise as a traceback prints it
_RAISED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?P<kind>[A-Za-z_]\w*(?:Error|Exception)): (?P<message>.+)$", re.M)


def _root(error: BaseException) -> tuple[str, str]:
    """The kind and first line of the error at the bottom of `error`.

    Ray wraps what went wrong in a worker (a task's error, a train worker's, a Ray Data UDF's)
    and, past a process boundary, keeps the inner errors only as traceback text: the first
    raise printed there is the root.
    """
    chain = [error]
    while (inner := _inner(chain[-1])) is not None and inner not in chain:
        chain.append(inner)
    for e in chain:
        raised = _RAISED.search(str(e))
        if raised:
            return raised["kind"], raised["message"].strip()
    return type(chain[-1]).__name__, (str(chain[-1]).strip().splitlines() or [""])[0]


def _inner(error: BaseException) -> BaseException | None:
    """The error `error` wraps: a Ray task's, a train worker's, the Train controller's, or its cause."""
    inner = (
        getattr(error, "cause", None)
        or next(iter((getattr(error, "worker_failures", None) or {}).values()), None)
        or getattr(error, "controller_failure", None)
        or error.__cause__
    )
    return inner if isinstance(inner, BaseException) else None


def _shutdown_ray(console: Console) -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        time.sleep(1.0)  # Ray forwards workers' output every 0.1-0.5 s: let their last lines reach the log
        from muscle_ray.runtime import session_logs

        logs = session_logs()
        if logs is not None and console.log_path is not None:
            link = console.log_path.parent / "ray-session"
            if link.is_dir() and not link.is_symlink():  # a copy back from a URI --out holds it as a folder
                shutil.rmtree(link)
            link.unlink(missing_ok=True)
            link.symlink_to(logs)
        ray.shutdown()
