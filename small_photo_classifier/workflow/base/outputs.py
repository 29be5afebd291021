"""The run folder: where every output of a run goes, written atomically.

`RunFolder` owns the folder's files (CSV tables, JSON, ``metrics.json`` sections)
and the list of outputs printed at the end of a run. `write_predictions` writes
the prediction CSV in the layout the task calls for.
"""

import csv
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from small_photo_classifier.pipeline import labels as labels_lib
from small_photo_classifier.pipeline.atomic import atomic_path, atomic_write_text

METRICS = "metrics.json"


def write_csv(frame: pd.DataFrame, path: str) -> str:
    """Writes a CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def write_json(path: str, data) -> str:
    """Writes ``data`` as indented JSON atomically (NumPy numbers become floats)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    return path


def read_json(path: str) -> dict:
    """A JSON file as a dict ({} when absent or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


class RunFolder:
    """One run's folder (``--workdir``): its files are listed, with their roles, in
    `workflow.base.run_files`."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)

    def file(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    @property
    def metrics_path(self) -> str:
        return self.file(METRICS)

    def write_csv(self, frame: pd.DataFrame, *parts) -> str:
        return write_csv(frame, self.file(*parts))

    def write_json(self, data, *parts) -> str:
        return write_json(self.file(*parts), data)

    def metrics(self) -> dict:
        """``metrics.json`` as a dict ({} when absent)."""
        return read_json(self.metrics_path)

    def update_metrics(self, section: str, values) -> dict:
        """Merges ``{section: values}`` into ``metrics.json`` (atomically)."""
        data = self.metrics()
        if not data and os.path.isfile(self.metrics_path):
            logging.warning("Replacing unreadable %s.", self.metrics_path)
        data[section] = values
        write_json(self.metrics_path, data)
        return data


def write_predictions(names: Sequence[str], probs, path: str, class_names: Sequence[str],
                      binary_column: Optional[str] = "invasive", values=None, status=None,
                      extra=None) -> str:
    """Writes the prediction CSV atomically (never a half-written file).

    Binary: ``name,<binary_column>`` with P(positive). Several classes or labels:
    ``name,<class_1>,...,<class_K>`` in the stored class order. ``values`` (a column
    name, e.g. ``label`` or ``tags``, and one string per row) replaces the probabilities:
    ``name,label``. No probability columns at all (``probs`` of shape [N, 0]): ``name``
    and the extra columns alone.

    ``extra`` (column name -> one string per row) adds columns after the values (e.g. the
    unfamiliar score), empty where the image was not predicted. ``status`` (one string
    per row, "ok" for a predicted image) adds a last column ``status``; a row whose
    status is not "ok" gets empty values, never a number or a class: an image that
    could not be read has no prediction.
    """
    probs = np.asarray(probs, np.float64)
    ok = [s == "ok" for s in status] if status is not None else [True] * len(names)
    more = dict(extra or {})
    columns = list(more)
    extra = columns + (["status"] if status is not None else [])

    def tail(i):
        return ([more[c][i] if ok[i] else "" for c in columns]
                + ([status[i]] if status is not None else []))
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if values is not None:
                column, texts = values
                writer.writerow(["name", column, *extra])
                writer.writerows([name, texts[i] if ok[i] else "", *tail(i)]
                                 for i, name in enumerate(names))
            elif probs.ndim == 2 and probs.shape[1] == 0:  # the extra columns alone
                writer.writerow(["name", *extra])
                writer.writerows([name, *tail(i)] for i, name in enumerate(names))
            elif probs.ndim == 1:
                writer.writerow(["name", binary_column, *extra])
                writer.writerows([name, f"{float(probs[i]):.6f}" if ok[i] else "", *tail(i)]
                                 for i, name in enumerate(names))
            else:
                writer.writerow(["name", *class_names, *extra])
                writer.writerows(
                    [name, *((f"{float(p):.6f}" for p in probs[i]) if ok[i]
                             else [""] * probs.shape[1]), *tail(i)]
                    for i, name in enumerate(names))
    return path


def binary_column(class_names: Sequence[str], sample_csv: Optional[str] = None,
                  label_column: Optional[str] = None) -> str:
    """The probability column of a binary prediction CSV: ``sample_submission.csv``'s
    column when there is one, else the training labels CSV's column (Kaggle layout,
    e.g. ``invasive``), else the positive class's name (class folders: ``bees``).

    A model from before the labels column was recorded, trained on 0/1 labels, keeps
    ``invasive`` (the only 0/1 column the Kaggle layout read without --label_column)."""
    if sample_csv:
        columns = labels_lib.sample_columns(sample_csv)
        if len(columns) == 1:
            return columns[0]
    if label_column:
        return label_column
    if tuple(class_names) == ("0", "1"):
        return labels_lib.LABEL_COLUMN
    return str(class_names[-1])
