"""Seconds and peak memory of each stage of a run: what ``metrics.json`` (``timings``,
``peak_memory_mb``), the console's last lines and ``report.html`` show.

Peak memory is the process's resident set (RSS) at its highest during the stage. On
Linux the kernel's high-water mark (``VmHWM``) is reset when a stage starts (writing 5
to ``/proc/self/clear_refs``), so each stage's peak is its own, not the largest of
every stage before it. Elsewhere, or where the reset is refused, a stage's figure is
the process's peak so far (``resource.getrusage``), and the record says so.
"""

import contextlib
import resource
import sys
import time
from typing import Dict, List, Optional

_STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"
TOTAL = "total"


def _high_water_mb() -> Optional[float]:
    """The kernel's peak RSS since the last reset, in MB (None where unreadable)."""
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_high_water() -> bool:
    try:
        with open(_CLEAR, "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _give_back_freed_memory() -> None:
    """glibc keeps freed heap memory mapped for reuse; ``malloc_trim`` hands it back to
    the system, so that a stage's peak is not raised by what the stage before it freed
    (elsewhere: nothing to do)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_so_far_mb() -> float:
    """The process's peak RSS since it started, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class StageClock:
    """Time and peak memory per named stage; stages may nest (an outer stage's peak
    includes its inner stages')."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.peak_mb: Dict[str, float] = {}
        self._open: List[str] = []
        self._started: Dict[str, float] = {}
        self.per_stage = _high_water_mb() is not None and _reset_high_water()

    def _fold_peak(self) -> None:
        """Adds the peak since the last reset to every open stage, and resets it."""
        if not self.per_stage:
            peak = peak_so_far_mb()
        else:
            peak = _high_water_mb() or 0.0
            self.per_stage = _reset_high_water()
        for name in self._open:
            self.peak_mb[name] = max(self.peak_mb.get(name, 0.0), peak)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Times the block as ``name`` (a stage run twice adds up) and records its peak."""
        self._fold_peak()
        self._open.append(name)
        self.seconds.setdefault(name, 0.0)  # listed in the order stages start
        self._started[name] = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - self._started.pop(name)
            self._fold_peak()
            _give_back_freed_memory()
            self._open.remove(name)

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
        return {"timings": {k: round(self.seconds[k], 2) for k in self._order()},
                "peak_memory_mb": {k: round(self.peak_mb.get(k, 0.0)) for k in self._order()},
                "peak_memory_is": ("each stage's own peak RSS" if self.per_stage else
                                   "the process's peak RSS up to the end of each stage")}

    def table(self) -> str:
        """The stages as console lines: name, seconds, peak memory."""
        width = max([len(k) for k in self.seconds] + [5])
        lines = [f"  {'stage':{width}s} {'seconds':>8s} {'peak memory':>12s}"]
        for name in self._order():
            lines.append(f"  {name:{width}s} {self.seconds[name]:8.1f} "
                         f"{self.peak_mb.get(name, float('nan')) / 1024:9.2f} GB")
        return "\n".join(lines)
