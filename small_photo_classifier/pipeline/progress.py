"""What a rerun would do if the run stopped now, kept current by the long stages.

An interrupted run (Ctrl-C, SIGTERM, a full disk) prints these lines, so the
user learns that a rerun resumes extraction from N of M rows or continues
fine-tuning from epoch K, instead of guessing.
"""

from typing import Callable, Dict, Union

_STATE: Dict[str, Union[str, Callable[[], str]]] = {}


def report(stage: str, text: Union[str, Callable[[], str]]) -> None:
    """Records (replaces) what a rerun would do about ``stage``: a text, or a function
    that says it when asked (e.g. from the files on disk at that moment)."""
    _STATE[stage] = text


def clear(stage: str) -> None:
    """``stage`` finished: nothing to resume there."""
    _STATE.pop(stage, None)


def summary() -> str:
    """One line per stage in progress (empty when none)."""
    return "\n".join(f"  {text() if callable(text) else text}" for text in _STATE.values())


class _PlainBar:
    """Progress as plain lines (at each quarter), for a pipe or a file: no carriage
    returns or colours, so a tee'd log stays readable."""

    def __init__(self, total: int, unit: str, label: str, steps: int = 4):
        import time
        self.total, self.unit, self.label, self.done = max(1, total), unit, label, 0
        self.steps = steps
        self._clock, self._start, self._shown = time.perf_counter, time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.done += n
        quarter = int(self.steps * self.done / self.total)
        if quarter > self._shown or self.done >= self.total:
            self._shown = quarter
            seconds = self._clock() - self._start
            print(f"  {self.label + ': ' if self.label else ''}{self.done}/{self.total} "
                  f"{self.unit}s ({100 * self.done // self.total}%, {seconds:.0f} s)",
                  flush=True)
            if self.done >= self.total:
                self._shown = self.steps + 1  # never again, even if more is added


def bar(total: int, unit: str, label: str = "", lines: int = 4):
    """A progress bar counting ``unit``s: Keras' bar on a terminal, plain lines
    otherwise (``lines`` of them: at each quarter by default, 1: only when done). Both
    take ``.add(n)``."""
    import sys
    if sys.stdout.isatty():
        import keras
        return keras.utils.Progbar(total, unit_name=unit)
    return _PlainBar(total, unit, label, lines)
