"""Labels CSVs: reading them, and deciding what kind of problem they describe.

One labels CSV has a ``name`` column (the image's file name without extension)
and its labels in one of these forms:

* ``name,invasive`` with 0/1: the reference problem, binary (positive class "1");
* ``name,<column>`` with two values (binary: 0/1, or two class names, the second in
  sorted order positive), or more than two class names or integers (multi-class);
* ``name,tags`` with space-separated labels per image (multi-label, Planet-Amazon
  style; any single column whose values contain spaces);
* ``name,<label_1>,...,<label_K>`` with 0/1 in each column (multi-label).

Labels are encoded as `features.task` expects: an int per image (binary,
multi-class) or a 0/1 tuple per image (multi-label), in a class order fixed once:
sorted names (integers numerically), or an order given (``sample_submission.csv``'s
columns, or a trained model's classes).
"""

import dataclasses
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from small_photo_classifier.pipeline.errors import ConfigError, DataError

NAME_COLUMN = "name"
LABEL_COLUMN = "invasive"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
KINDS = ("binary", "multiclass", "multilabel")
# A label seen fewer times than this gets a warning: too few to learn or to validate.
RARE = 5
_MAX_LISTED = 5


@dataclasses.dataclass
class Labels:
    """What a labels CSV says.

    Attributes:
      frame: columns ``name``, ``label`` (encoded, see the module docstring), ``line``.
      kind: "binary", "multiclass" or "multilabel".
      class_names: the classes in their fixed order ((negative, positive) for binary).
      columns: the CSV columns the labels came from.
    """
    frame: pd.DataFrame
    kind: str
    class_names: tuple
    columns: tuple


def listing(items: Sequence, limit: int = _MAX_LISTED) -> str:
    """``'a', 'b' and 3 more`` for messages."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def is_image_file(filename: str) -> bool:
    """True if the file name has an image extension we read (case-insensitive)."""
    return os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def image_name(path: str) -> str:
    """The id of an image in CSVs: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


def _check_name(name: str, csv_path: str, line: int) -> None:
    """Rejects names that would point outside the image folder."""
    if not name:
        raise DataError(f"{csv_path} line {line}: the {NAME_COLUMN} is empty.")
    if ("/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name)
            or "\x00" in name):
        raise DataError(
            f"{csv_path} line {line}: name {name!r} contains a path; names must be plain "
            f"file names (without folders), so that they can only refer to images inside "
            "the data folder.")


def read_table(csv_path: str) -> pd.DataFrame:
    """A CSV as strings, stripped, with a ``line`` column (header = line 1).

    Tolerates a UTF-8 byte-order mark and whitespace around headers and values.
    """
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False,
                            encoding="utf-8-sig", skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as err:
        raise DataError(f"Cannot read {csv_path} as a CSV file: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.apply(lambda col: col.str.strip())
    frame["line"] = np.arange(2, len(frame) + 2)
    return frame


def read_names_csv(csv_path: str, required: Sequence[str]) -> pd.DataFrame:
    """Reads a CSV that must have the ``required`` columns (plus ``line``), as strings.

    Raises:
      DataError: unreadable file, missing columns, or empty, duplicate or path-like names.
    """
    frame = read_table(csv_path)
    absent = [c for c in required if c not in frame.columns]
    if absent:
        found = [c for c in frame.columns if c != "line"]
        raise DataError(
            f"{csv_path} must have columns {', '.join(required)}; missing "
            f"{', '.join(absent)} (found columns: {', '.join(found) or 'none'}).")
    frame = frame[list(required) + ["line"]].reset_index(drop=True)
    for name, line in zip(frame[NAME_COLUMN], frame.line):
        _check_name(name, csv_path, int(line))
    dupes = frame[frame[NAME_COLUMN].duplicated(keep=False)]
    if len(dupes):
        first = dupes.groupby(NAME_COLUMN, sort=False).line.apply(list)
        raise DataError(
            f"{csv_path} has duplicate names: " + "; ".join(
                f"{name!r} on lines {', '.join(map(str, lines))}"
                for name, lines in list(first.items())[:_MAX_LISTED]) + ".")
    return frame


def _label_columns(csv_path: str, columns: List[str], label_column: Optional[str],
                   table: pd.DataFrame) -> List[str]:
    """Which columns hold the labels (see the module docstring)."""
    if label_column:
        if label_column not in columns:
            raise ConfigError(f"--label_column={label_column!r} is not a column of {csv_path}; "
                              f"its columns are {', '.join(columns) or 'none'}.")
        return [label_column]
    if LABEL_COLUMN in columns:
        return [LABEL_COLUMN]
    if len(columns) == 1:
        return columns
    if len(columns) > 1 and all(table[c].isin(["0", "1", "0.0", "1.0"]).all() for c in columns):
        return columns  # one 0/1 column per label
    raise DataError(f"{csv_path} has several label columns ({', '.join(columns)}) and they are "
                    "not all 0/1 (one column per label): pass --label_column=NAME to choose "
                    "one." if columns else f"{csv_path} has no label column next to "
                    f"{NAME_COLUMN!r}.")


def _as_binary01(values: pd.Series) -> Optional[list]:
    """0/1 labels (also written 0.0/1.0), or None when the column holds anything else."""
    out = []
    for raw in values:
        try:
            value = float(raw)
        except ValueError:
            return None
        if value not in (0.0, 1.0):
            return None
        out.append(int(value))
    return out


def _strict_binary(values, lines, csv_path: str, column: str) -> list:
    """The reference problem's ``invasive`` column: 0 or 1 on every line."""
    out = _as_binary01(values)
    if out is not None:
        return out
    for raw, line in zip(values, lines):
        try:
            ok = float(raw) in (0.0, 1.0)
        except ValueError:
            ok = False
        if not ok:
            raise DataError(f"{csv_path} line {line}: label {raw!r} in column {column!r} must "
                            "be 0 or 1.")
    raise AssertionError("unreachable")


def _class_order(names, given: Optional[Sequence[str]], where: str) -> tuple:
    """The fixed class order: ``given`` (which must hold exactly these classes) or sorted
    (integers numerically)."""
    names = sorted(set(names), key=lambda n: (0, int(n), "") if n.lstrip("-").isdigit()
                   else (1, 0, n))
    if given is None:
        return tuple(names)
    given = tuple(str(g) for g in given)
    missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing:
        raise DataError(f"{where}: the classes {listing(given)} do not include "
                        f"{listing(missing)}, which the labels use.")
    if extra:
        logging.warning("%s: class(es) %s have no labelled image.", where, listing(extra))
    return given


def _single_column(csv_path, frame, column, task, class_order, positive_class) -> Labels:
    values, lines = frame[column], frame.line
    empty = [int(line) for raw, line in zip(values, lines) if raw == ""]
    if empty and task != "multilabel" and not values.str.contains(" ").any():
        raise DataError(f"{csv_path} line {empty[0]}: label '' in column {column!r}: the label "
                        "is empty" + (f" (also on lines {', '.join(map(str, empty[1:6]))})"
                                      if len(empty) > 1 else "") + ".")
    if task == "multilabel" or (task is None and values.str.contains(" ").any()):
        return _tags(csv_path, frame, column, class_order)
    if column == LABEL_COLUMN and task in (None, "binary") and positive_class in (None, "1"):
        labels = _strict_binary(values, lines, csv_path, column)
        return Labels(frame.assign(label=labels)[[NAME_COLUMN, "label", "line"]], "binary",
                      ("0", "1"), (column,))
    numeric = [v.lstrip("-").replace(".", "", 1).isdigit() for v in values]
    if any(numeric) and not all(numeric):
        number = next(line for n, line in zip(numeric, lines) if n)
        word = next(line for n, line in zip(numeric, lines) if not n)
        raise DataError(f"{csv_path}: column {column!r} mixes numbers (e.g. line {number}) "
                        f"and names (e.g. line {word}); use one or the other for every class.")
    zero_one = _as_binary01(values)
    texts = [str(int(float(v))) if n else v for v, n in zip(values, numeric)]
    names = _class_order(texts, class_order, csv_path)
    kind = task or ("binary" if len(names) == 2 else "multiclass")
    if kind == "binary":
        if len(names) != 2:
            raise ConfigError(f"--task=binary needs two classes; {csv_path} column {column!r} "
                              f"has {len(names)}: {listing(names)}.")
        positive = positive_class or ("1" if zero_one is not None else names[1])
        if positive not in names:
            raise ConfigError(f"--positive_class={positive!r} is not one of the classes in "
                              f"{csv_path}: {listing(names)}.")
        names = tuple(n for n in names if n != positive) + (positive,)
    index = {n: i for i, n in enumerate(names)}
    return Labels(frame.assign(label=[index[t] for t in texts])[[NAME_COLUMN, "label", "line"]],
                  kind, tuple(names), (column,))


def _tags(csv_path, frame, column, class_order) -> Labels:
    """Space-separated tags per image (multi-label)."""
    tags = [v.split() for v in frame[column]]
    empty = [int(line) for t, line in zip(tags, frame.line) if not t]
    if empty:
        raise DataError(f"{csv_path} line {empty[0]}: the image has no tags in column "
                        f"{column!r}; every image of a multi-label set needs at least one.")
    names = _class_order([t for row in tags for t in row], class_order, csv_path)
    index = {n: i for i, n in enumerate(names)}
    encoded = []
    for row in tags:
        vector = [0] * len(names)
        for t in row:
            vector[index[t]] = 1
        encoded.append(tuple(vector))
    return Labels(frame.assign(label=encoded)[[NAME_COLUMN, "label", "line"]], "multilabel",
                  tuple(names), (column,))


def _zero_one_columns(csv_path, frame, columns, class_order) -> Labels:
    """One 0/1 column per label (multi-label)."""
    names = _class_order(columns, class_order, csv_path) if class_order else tuple(columns)
    values = np.array([[int(float(frame[c].iloc[i])) for c in names]
                       for i in range(len(frame))], dtype=int).reshape(len(frame), len(names))
    empty = [int(line) for row, line in zip(values, frame.line) if not row.any()]
    if empty:
        raise DataError(f"{csv_path} line {empty[0]}: the image has no label (every column of "
                        f"{', '.join(names)} is 0); every image needs at least one.")
    return Labels(frame.assign(label=[tuple(r) for r in values])[[NAME_COLUMN, "label", "line"]],
                  "multilabel", tuple(names), tuple(names))


def read_labels(csv_path: str, label_column: Optional[str] = None, task: Optional[str] = None,
                class_order: Optional[Sequence[str]] = None,
                positive_class: Optional[str] = None) -> Labels:
    """Reads a labels CSV and decides its kind of problem (see the module docstring).

    A name may carry its image extension (``12.jpg``); it is stripped so that names
    match file names without extension.

    Args:
      label_column: the column to use (default: ``invasive``, else the only one, else
        every column when they are all 0/1).
      task: force "binary", "multiclass" or "multilabel" instead of detecting it.
      class_order: fix the order of the classes (they must cover every label).
      positive_class: binary: which of the two classes is positive.

    Raises:
      DataError: naming the line of the first bad value, or the columns to choose from.
    """
    if task is not None and task not in KINDS:
        raise ConfigError(f"--task={task!r}: choose one of {', '.join(KINDS)}.")
    table = read_table(csv_path)
    if NAME_COLUMN not in table.columns:
        found = [c for c in table.columns if c != "line"]
        raise DataError(f"{csv_path} must have a {NAME_COLUMN!r} column (found columns: "
                        f"{', '.join(found) or 'none'}).")
    if table.empty:
        raise DataError(f"{csv_path} has a header but no rows.")
    others = [c for c in table.columns if c not in (NAME_COLUMN, "line")]
    columns = _label_columns(csv_path, others, label_column, table)
    frame = read_names_csv(csv_path, [NAME_COLUMN, *columns])
    frame[NAME_COLUMN] = [image_name(n) if is_image_file(n) else n for n in frame[NAME_COLUMN]]
    dupes = frame[frame[NAME_COLUMN].duplicated(keep=False)]
    if len(dupes):  # e.g. "12" and "12.jpg"
        raise DataError(f"{csv_path} names the same image twice: " + ", ".join(
            f"line {line}: {name!r}" for name, line in zip(dupes[NAME_COLUMN], dupes.line)) + ".")
    if len(columns) > 1:
        labels = _zero_one_columns(csv_path, frame, columns, class_order)
    else:
        labels = _single_column(csv_path, frame, columns[0], task, class_order, positive_class)
    warn_rare(labels.kind, labels.class_names, labels.frame.label, csv_path)
    return labels


def counts(kind: str, class_names: Sequence[str], encoded) -> dict:
    """Images per class (per label for multi-label)."""
    encoded = list(encoded)
    if kind == "multilabel":
        totals = np.asarray(encoded, int).sum(axis=0) if encoded else np.zeros(len(class_names))
        return {n: int(c) for n, c in zip(class_names, totals)}
    values = np.bincount(np.asarray(encoded, int), minlength=len(class_names))
    return {n: int(c) for n, c in zip(class_names, values)}


def warn_rare(kind: str, class_names: Sequence[str], encoded, where: str) -> None:
    """Warns about labels used fewer than `RARE` times, naming them."""
    rare = [n for n, c in counts(kind, class_names, encoded).items() if 0 < c < RARE]
    if rare:
        logging.warning("%s: label(s) %s occur fewer than %d times: too few to learn from or to "
                        "validate reliably.", where, listing(rare), RARE)


def label_text(kind: str, class_names: Sequence[str], label) -> str:
    """A label as people read it: the class name (binary and multi-class; ``0``/``1`` for
    a 0/1 labels CSV, whose classes are named so), space-separated tags for multi-label."""
    if kind in ("binary", "multiclass"):
        return class_names[int(label)]
    return " ".join(n for n, v in zip(class_names, label) if v)


def sample_columns(sample_csv: str) -> Tuple[str, ...]:
    """The prediction columns of a ``sample_submission.csv`` (every column but ``name``)."""
    table = read_table(sample_csv)
    return tuple(c for c in table.columns if c not in (NAME_COLUMN, "line"))
