"""Labels that look wrong: confident learning on out-of-fold predictions.

Every training image has an out-of-fold prediction from cross-validation: a model
that never saw it. Following confident learning (Northcutt, Jiang and Chuang,
2021), each class gets a threshold, the mean predicted probability of that class
among the images labelled with it (per fold, since fold models differ in scale).
Confident learning's rule (cleanlab's ``compute_confident_joint``): the classes whose
probability reaches their threshold are the image's confident classes; its likely
true class is the most probable of them; the image is suspect when that class is not
its label. (An image whose label is still the most probable confident class is not
suspect, however close another class comes.) Images with no confident class are not
counted. The suspects are ranked by how far the likely class's probability exceeds
the label's.
"""

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from small_photo_classifier.features.task import Task


def _matrix(task: Task, probs) -> np.ndarray:
    probs = np.asarray(probs, np.float64)
    return np.stack([1 - probs, probs], axis=1) if probs.ndim == 1 else probs


def likely_classes(p, y) -> np.ndarray:
    """Confident learning's likely true class of each image: the most probable of the
    classes whose probability reaches their threshold (the mean probability of that
    class among the images labelled with it; 1e-6 of slack as cleanlab allows), or -1
    when no class reaches its threshold."""
    p, y = np.asarray(p, np.float64), np.asarray(y, int)
    thresholds = np.array([p[y == j, j].mean() if (y == j).any() else np.inf
                           for j in range(p.shape[1])])
    confident = p >= thresholds - 1e-6
    guess = np.where(confident, p, -np.inf).argmax(axis=1)
    return np.where(confident.any(axis=1), guess, -1)


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
    names = np.asarray(task.class_names, dtype=object)
    parts = []
    for fold in np.unique(folds):
        members = np.flatnonzero(folds == fold)
        guess = likely_classes(p[members], y[members])
        hit = (guess >= 0) & (guess != y[members])
        i, j = members[hit], guess[hit]
        label, predicted = p[i, y[i]], p[i, j]
        parts.append(pd.DataFrame({"row": i, "label": names[y[i]], "predicted": names[j],
                                   "confidence": predicted, "given": label,
                                   "margin": predicted - label}))
    return _ranked(parts)


def _ranked(parts) -> pd.DataFrame:
    """The suspects of every fold as one table, most confident contradiction first."""
    columns = ["row", "label", "predicted", "confidence", "given", "margin"]
    parts = [p for p in parts if len(p)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    table = table[columns].astype({"row": int, "confidence": float, "given": float,
                                   "margin": float})
    return table.sort_values("margin", ascending=False, kind="stable").reset_index(drop=True)


def _multilabel(task: Task, y, p, folds) -> pd.DataFrame:
    """Per fold and label: a label marked absent whose probability reaches the mean
    probability of the images that have it, or marked present whose 1 - probability
    reaches the mean of the images that lack it (array operations; rows in image order
    within a fold and label)."""
    parts = []
    for fold in np.unique(folds):
        members = np.flatnonzero(folds == fold)
        for j, name in enumerate(task.class_names):
            yj, pj = y[members, j], p[members, j]
            present, absent = yj == 1, yj == 0
            on = pj[present].mean() if present.any() else np.inf
            off = (1 - pj[absent]).mean() if absent.any() else np.inf
            missed, extra = absent & (pj >= on), present & (1 - pj >= off)
            hit = missed | extra
            was_absent = missed[hit]
            q = pj[hit]
            parts.append(pd.DataFrame({
                "row": members[hit],
                "label": np.where(was_absent, f"no {name}", name),
                "predicted": np.where(was_absent, name, f"no {name}"),
                "confidence": np.where(was_absent, q, 1 - q),
                "given": np.where(was_absent, 1 - q, q),
                "margin": np.where(was_absent, 2 * q - 1, 1 - 2 * q)}))
    return _ranked(parts)
