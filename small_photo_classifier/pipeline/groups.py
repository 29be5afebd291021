"""Groups of photos that must stay on one side of every split: several photos of one
plant, one camera's burst, one site's visits.

A random split puts near-copies on both sides, and every estimate and choice made on
the held-out side turns optimistic. The user names the groups with a column of the
labels CSV (``--groups=site``) or a pattern of the file names
(``--group_pattern='^(cam\\d+)_'``: the first capture group); every split and fold
(`pipeline.split`, `features.choose.cv.make_folds`) then keeps a group whole.
"""

import dataclasses
import os
import re
from typing import Optional

import numpy as np
import pandas as pd

from small_photo_classifier.pipeline import labels as labels_lib
from small_photo_classifier.pipeline.errors import ConfigError, DataError

COLUMN = "group"  # the frame's column of group names, when there are groups


@dataclasses.dataclass(frozen=True)
class Summary:
    """What the console, metrics.json and the report say of the groups."""
    source: str          # e.g. "the column 'site' of train_labels.csv"
    groups: int
    photos: int
    largest: int
    largest_name: str

    def sentence(self) -> str:
        return (f"{self.groups} groups of photos from {self.source} ({self.photos} photos; "
                f"the largest, {self.largest_name!r}, has {self.largest}): each stays "
                "on one side of every split and fold")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_pattern(pattern: Optional[str]) -> Optional[str]:
    """``--group_pattern``, checked before any work: a regular expression with a
    capture group."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"--group_pattern={pattern!r} is not a regular expression: {err}.")
    if compiled.groups < 1:
        raise ConfigError(f"--group_pattern={pattern!r} has no capture group: the group is "
                          "the part of the file name in the first (...), e.g. '^(cam\\d+)_'.")
    return pattern


def assign(frame: pd.DataFrame, column: Optional[str], pattern: Optional[str],
           labels_csv: Optional[str]) -> tuple:
    """(``frame`` with a ``group`` column, `Summary`), or (``frame``, None) without
    ``column`` and ``pattern``.

    Args:
      frame: the labelled photos (``name``, ``path``).
      column: a column of the labels CSV ``labels_csv`` (Kaggle layout) naming each
        photo's group; an empty cell is an error naming its line.
      pattern: a regular expression whose first capture group, searched in the file
        name (without extension), is the group; a photo it does not match is an error
        naming a few of them.
    """
    if column and pattern:
        raise ConfigError("--groups and --group_pattern both name the groups: pass one.")
    if column:
        names = _from_column(frame, column, labels_csv)
        source = f"the column {column!r} of {os.path.basename(labels_csv)}"
    elif pattern:
        names = _from_pattern(frame, pattern)
        source = f"the file names (--group_pattern='{pattern}')"
    else:
        return frame, None
    frame = frame.assign(**{COLUMN: names})
    counts = frame[COLUMN].value_counts()
    return frame, Summary(source, int(len(counts)), int(len(frame)), int(counts.iloc[0]),
                          str(counts.index[0]))


def _from_pattern(frame: pd.DataFrame, pattern: str) -> list:
    compiled = re.compile(pattern)
    found, missed = [], []
    for name in frame.name.astype(str):
        match = compiled.search(os.path.basename(name))
        if match is None or not match.group(1):
            missed.append(name)
        found.append(match.group(1) if match else None)
    if missed:
        raise DataError(f"--group_pattern={pattern!r} names no group for {len(missed)} of "
                        f"{len(frame)} photos (its first capture group must match part of "
                        f"each file name), e.g. {', '.join(repr(m) for m in missed[:5])}.")
    return found


def _from_column(frame: pd.DataFrame, column: str, labels_csv: Optional[str]) -> list:
    if labels_csv is None or not os.path.isfile(labels_csv):
        raise ConfigError(f"--groups={column!r} names a column of the labels CSV, and this "
                          "data has none (a folder per class): name the groups with "
                          "--group_pattern, a pattern of the file names, instead.")
    table = labels_lib.read_table(labels_csv)
    if column not in table.columns:
        found = [c for c in table.columns if c != "line"]
        raise DataError(f"--groups={column!r}: {labels_csv} has no such column (found "
                        f"columns: {', '.join(found)}).")
    names = [labels_lib.image_name(n) if labels_lib.is_image_file(n) else n
             for n in table[labels_lib.NAME_COLUMN].astype(str)]
    values = table[column].astype(str).str.strip()
    empty = table.line[values == ""].tolist()
    if empty:
        raise DataError(f"--groups={column!r}: {labels_csv} has no group for line(s) "
                        f"{', '.join(map(str, empty[:5]))}; every photo needs one.")
    by_name = dict(zip(names, values))
    return [by_name[n] for n in frame.name]


def of(frame: pd.DataFrame) -> Optional[np.ndarray]:
    """The group of each row of ``frame``, or None when the run has no groups."""
    return frame[COLUMN].to_numpy(str) if COLUMN in frame.columns else None
