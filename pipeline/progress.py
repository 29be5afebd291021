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
