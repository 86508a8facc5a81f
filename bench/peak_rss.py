"""The benchmarks' driver-memory probe: this process's resident set size, sampled on a thread.

getrusage's peak is the process's whole life (Ray's start, imports); this one covers only the
`with` block it wraps."""

from __future__ import annotations

import os
import threading


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """`with PeakRSS() as m: ...` -> `m.peak`, the largest RSS in bytes seen every `every_s`."""

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak = every_s, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
