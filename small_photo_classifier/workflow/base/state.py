"""The run state: what each stage decided, typed and versioned, for the stages after it.

``run_state.json`` in the run folder is the one place a later stage, predict.py or
export.py reads a decision from (the probe's settings, each scenario's kept epoch and
settings, the heads stage's choice, what was exported). ``metrics.json`` and
``report.html`` are written for people and never read to decide anything: renaming a
key there cannot change what a run does.

Each stage writes its own part (`update`), atomically; the file carries
`SCHEMA_VERSION`. A run folder made before this file existed is read from its
``metrics.json`` once (`load`'s conversion), so old runs still go on.
"""

import dataclasses
import json
import os
from typing import Dict, Optional

from small_photo_classifier.pipeline.atomic import atomic_write_text
from small_photo_classifier.pipeline.errors import ConfigError

STATE_FILE = "run_state.json"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ProbeState:
    """The linear probe the heads stage chose (by CV on the training split)."""
    pooling: str
    standardised: bool
    c: float
    val_score: Optional[float] = None      # the task's headline metric, validation images
    cv_mean: Optional[float] = None
    cv_std: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class HeadState:
    """One scenario as the heads stage kept it."""
    epoch: int
    learning_rate: Optional[float] = None
    optimizer: str = "adam"
    dropout: Optional[float] = None
    views: int = 0
    val_score: Optional[float] = None
    cv_mean: Optional[float] = None
    cv_std: Optional[float] = None

    @property
    def score(self) -> Optional[float]:
        """What scenarios are ranked by: the CV mean when cross-validated."""
        return self.cv_mean if self.cv_mean is not None else self.val_score


@dataclasses.dataclass(frozen=True)
class ExportState:
    """What the final stage exported."""
    default: str                 # model.keras or bag.keras
    tta: int = 1
    refit: bool = False
    estimate: Optional[dict] = None


@dataclasses.dataclass
class RunState:
    """Everything a stage may read from the stages before it."""
    version: int = SCHEMA_VERSION
    probe: Optional[ProbeState] = None
    heads: Dict[str, HeadState] = dataclasses.field(default_factory=dict)
    choice: Optional[str] = None           # the scenario (or "probe") the heads stage chose
    choice_by: Optional[str] = None
    export: Optional[ExportState] = None
    stages: Dict[str, dict] = dataclasses.field(default_factory=dict)  # later stages' records
    # The commands report.html ends with, kept for whoever writes it again (export.py).
    report_commands: Dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunState":
        if data.get("version") != SCHEMA_VERSION:
            raise ConfigError(f"{STATE_FILE} has schema version {data.get('version')!r}; this "
                              f"version of the tool reads {SCHEMA_VERSION}. Rerun "
                              "--stage=heads to write it again.")
        return cls(
            probe=ProbeState(**data["probe"]) if data.get("probe") else None,
            heads={s: HeadState(**h) for s, h in (data.get("heads") or {}).items()},
            choice=data.get("choice"), choice_by=data.get("choice_by"),
            export=ExportState(**data["export"]) if data.get("export") else None,
            stages=dict(data.get("stages") or {}),
            report_commands=dict(data.get("report_commands") or {}))


def load(folder: str) -> RunState:
    """The run state of ``folder``: ``run_state.json``, or (a run folder from before it
    existed) converted from its ``metrics.json``; empty for a new folder."""
    path = os.path.join(folder, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return RunState.from_json(json.load(f))
    except FileNotFoundError:
        return _from_metrics(os.path.join(folder, "metrics.json"))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"Cannot read {path} ({err}); rerun --stage=heads to write it "
                          "again.") from err


def update(folder: str, **parts) -> RunState:
    """Sets the given parts of ``folder``'s state (the others as they were) and writes it
    atomically; returns the new state."""
    state = load(folder)
    for name, value in parts.items():
        if not hasattr(state, name):
            raise AttributeError(name)
        setattr(state, name, value)
    atomic_write_text(os.path.join(folder, STATE_FILE),
                      json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n")
    return state


def _from_metrics(path: str) -> RunState:
    """A run folder made before run_state.json: its decisions as metrics.json recorded
    them (read once, here, and nowhere else)."""
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return RunState()
    return RunState(probe=_probe(metrics.get("probe")), heads={
        s: _head(h) for s, h in (metrics.get("heads") or {}).items() if "epoch" in h},
        choice=(metrics.get("heads_choice") or {}).get("scenario"),
        choice_by=(metrics.get("heads_choice") or {}).get("by"),
        export=_export(metrics.get("export")), stages=dict(metrics.get("stages") or {}))


def _headline(entry: dict, prefix: str, suffix: str = "") -> Optional[float]:
    for metric in ("auc", "accuracy", "map"):
        if f"{prefix}{metric}{suffix}" in entry:
            return entry[f"{prefix}{metric}{suffix}"]
    return None


def _probe(entry: Optional[dict]) -> Optional[ProbeState]:
    if not entry or "pooling" not in entry:
        return None
    return ProbeState(entry["pooling"], bool(entry.get("standardised")), entry["C"],
                      _headline(entry, "val_"), _headline(entry, "cv_", "_mean"),
                      _headline(entry, "cv_", "_std"))


def _head(entry: dict) -> HeadState:
    return HeadState(int(entry["epoch"]), entry.get("learning_rate"),
                     entry.get("optimizer", "adam"), entry.get("dropout"),
                     int(entry.get("views") or 0), _headline(entry, "best_val_"),
                     _headline(entry, "cv_", "_mean"), _headline(entry, "cv_", "_std"))


def _export(entry: Optional[dict]) -> Optional[ExportState]:
    if not entry or "default" not in entry:
        return None
    return ExportState(entry["default"], int(entry.get("tta", 1)), bool(entry.get("refit")),
                       entry.get("estimate"))
