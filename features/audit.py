"""Labels that look wrong: confident learning on out-of-fold predictions.

Every training image has an out-of-fold prediction from cross-validation: a model
that never saw it. Following confident learning (Northcutt, Jiang and Chuang,
2021), each class gets a threshold, the mean predicted probability of that class
among the images labelled with it (per fold, since fold models differ in scale).
An image is suspect when another class's probability reaches that class's
threshold; the suspects are ranked by how far the other class's probability
exceeds the probability of the given label.
"""

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from features.task import Task


def _matrix(task: Task, probs) -> np.ndarray:
    probs = np.asarray(probs, np.float64)
    return np.stack([1 - probs, probs], axis=1) if probs.ndim == 1 else probs


def suspects(task: Task, y, oof_probs, fold_of: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Rows of training images whose label the out-of-fold predictions contradict, most
    confident first: ``row``, ``label``, ``predicted``, ``confidence`` (probability of
    the predicted class), ``given`` (probability of the label), ``margin``. For
    multi-label tasks, one row per (image, label) that looks wrongly present or absent."""
    y = np.asarray(y)
    folds = np.zeros(len(y), int) if fold_of is None else np.asarray(fold_of)
    if task.kind == "multilabel":
        return _multilabel(task, y.astype(int), np.asarray(oof_probs, np.float64), folds)
    p = _matrix(task, oof_probs)
    y = y.astype(int)
    rows = []
    for fold in np.unique(folds):
        members = np.flatnonzero(folds == fold)
        thresholds = np.array([p[members][y[members] == j, j].mean()
                               if (y[members] == j).any() else np.inf
                               for j in range(p.shape[1])])
        for i in members:
            others = [j for j in range(p.shape[1]) if j != y[i] and p[i, j] >= thresholds[j]]
            if not others:
                continue
            j = max(others, key=lambda c: p[i, c])
            rows.append({"row": int(i), "label": task.class_names[y[i]],
                         "predicted": task.class_names[j], "confidence": float(p[i, j]),
                         "given": float(p[i, y[i]]), "margin": float(p[i, j] - p[i, y[i]])})
    table = pd.DataFrame(rows, columns=["row", "label", "predicted", "confidence", "given",
                                        "margin"])
    return table.sort_values("margin", ascending=False, kind="stable").reset_index(drop=True)


def _multilabel(task: Task, y, p, folds) -> pd.DataFrame:
    rows = []
    for fold in np.unique(folds):
        members = np.flatnonzero(folds == fold)
        for j, name in enumerate(task.class_names):
            present, absent = y[members, j] == 1, y[members, j] == 0
            on = p[members][present, j].mean() if present.any() else np.inf
            off = (1 - p[members][absent, j]).mean() if absent.any() else np.inf
            for i in members:
                if y[i, j] == 0 and p[i, j] >= on:
                    rows.append({"row": int(i), "label": f"no {name}", "predicted": name,
                                 "confidence": float(p[i, j]), "given": float(1 - p[i, j]),
                                 "margin": float(2 * p[i, j] - 1)})
                elif y[i, j] == 1 and 1 - p[i, j] >= off:
                    rows.append({"row": int(i), "label": name, "predicted": f"no {name}",
                                 "confidence": float(1 - p[i, j]), "given": float(p[i, j]),
                                 "margin": float(1 - 2 * p[i, j])})
    table = pd.DataFrame(rows, columns=["row", "label", "predicted", "confidence", "given",
                                        "margin"])
    return table.sort_values("margin", ascending=False, kind="stable").reset_index(drop=True)
