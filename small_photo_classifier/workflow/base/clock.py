"""Seconds and peak memory of each stage of a run: what ``metrics.json`` (``timings``,
``peak_memory_mb``), the console's last lines and ``report.html`` show.

Peak memory is the process's resident set (RSS) at its highest during the stage. Two
sources, neither of which changes what anyone else measures (the kernel's own peak,
which ``/usr/bin/time`` and a parent's ``wait4`` read, is never reset):

* the process's peak so far (``getrusage``'s ``ru_maxrss``): when it rose during a
  stage, that stage set it, and its peak is exactly that;
* otherwise the largest RSS a background thread saw while the stage ran, reading
  ``/proc/self/statm`` every 20 ms (Linux). A spike shorter than that can be missed
  in a stage that did not set the process's peak; the run's peak (``total``) is exact.

Where ``/proc`` cannot be read, a stage's figure is the process's peak so far, and the
record says so.
"""

import contextlib
import os
import resource
import sys
import threading
import time
from typing import Dict, List, Optional

TOTAL = "total"
_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SAMPLE_SECONDS = 0.02


def _rss_mb() -> Optional[float]:
    """The process's resident set now, in MB (None where unreadable)."""
    try:
        with open(_STATM, encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE / (1 << 20)
    except (OSError, ValueError, IndexError):
        return None


def peak_so_far_mb() -> float:
    """The process's peak RSS since it started, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _give_back_freed_memory() -> None:
    """glibc keeps freed heap memory mapped for reuse; ``malloc_trim`` hands it back to
    the system, so that a stage's RSS does not carry what the stage before it freed
    (elsewhere: nothing to do)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StageClock:
    """Time and peak memory per named stage; stages may nest (an outer stage's peak
    includes its inner stages')."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.peak_mb: Dict[str, float] = {}
        self._open: List[str] = []
        self._started: Dict[str, float] = {}
        self.sampled = _rss_mb() is not None
        self._seen = 0.0  # the largest RSS sampled since the last fold
        self._process_peak = peak_so_far_mb()
        self._lock = threading.Lock()
        self._sampler: Optional[threading.Thread] = None

    def _sample(self) -> None:
        while self._open:
            rss = _rss_mb() or 0.0
            with self._lock:
                self._seen = max(self._seen, rss)
            time.sleep(SAMPLE_SECONDS)

    def _fold_peak(self) -> None:
        """Adds the peak since the last fold to every open stage, and starts afresh."""
        rss = _rss_mb()
        peak = peak_so_far_mb()
        with self._lock:
            seen = max(self._seen, rss or 0.0)
            self._seen = rss or 0.0
        if peak > self._process_peak + 1:  # a new peak for the process: set in here
            seen = max(seen, peak)
        self._process_peak = max(self._process_peak, peak)
        if not self.sampled:
            seen = peak
        for name in self._open:
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), seen)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Times the block as ``name`` (a stage run twice adds up) and records its peak."""
        # Freed heap handed back first, so the stage's figure starts from what is in use
        # (not from what whatever ran before it freed).
        _give_back_freed_memory()
        self._fold_peak()
        self._open.append(name)
        self.seconds.setdefault(name, 0.0)  # listed in the order stages start
        self._started[name] = time.perf_counter()
        if self.sampled and (self._sampler is None or not self._sampler.is_alive()):
            self._sampler = threading.Thread(target=self._sample, daemon=True,
                                             name="stage-memory")
            self._sampler.start()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - self._started.pop(name)
            self._fold_peak()
            self._open.remove(name)
            if name == TOTAL:
                self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), peak_so_far_mb())
            _give_back_freed_memory()

    def elapsed(self, name: str) -> float:
        """Seconds of ``name`` so far, the time of the current run of it included."""
        return self.seconds.get(name, 0.0) + (time.perf_counter() - self._started[name]
                                              if name in self._started else 0.0)

    def peak_so_far(self, name: str) -> float:
        """Peak MB of ``name`` so far (an open stage's peak up to now)."""
        self._fold_peak()
        return self.peak_mb.get(name, 0.0)

    def _order(self) -> List[str]:
        """Stages in the order they started, the whole run (``TOTAL``) last."""
        return [k for k in self.seconds if k != TOTAL] + [k for k in self.seconds if k == TOTAL]

    def record(self) -> dict:
        """What ``metrics.json`` stores: ``timings`` and ``peak_memory_mb`` by stage."""
        # metrics.json is written with sorted keys: the order the stages ran is kept apart.
        return {"stage_order": self._order(),
                "timings": {k: round(self.seconds[k], 2) for k in self._order()},
                "peak_memory_mb": {k: round(self.peak_mb.get(k, 0.0)) for k in self._order()},
                "peak_memory_is": (
                    "each stage's largest RSS (sampled every 20 ms; exact for the stage "
                    "that set the run's peak); total: the process's peak"
                    if self.sampled else
                    "the process's peak RSS up to the end of each stage")}

    def table(self) -> str:
        """The stages as console lines: name, seconds, peak memory."""
        width = max([len(k) for k in self.seconds] + [5])
        lines = [f"  {'stage':{width}s} {'seconds':>8s} {'peak memory':>12s}"]
        for name in self._order():
            lines.append(f"  {name:{width}s} {self.seconds[name]:8.1f} "
                         f"{self.peak_mb.get(name, float('nan')) / 1024:9.2f} GB")
        return "\n".join(lines)
