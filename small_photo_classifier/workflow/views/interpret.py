"""What a model gets wrong: the confusion matrix, ROC curve and top losses of one set.

The analysis lives here (which images are the top losses, which pairs of classes
are most confused); drawing is `workflow.views.plots`.
"""

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from small_photo_classifier.features.task import Task
from small_photo_classifier.workflow.views import plots

FILES = plots.FILES


def losses(task: Task, y, probs) -> np.ndarray:
    """Each image's cross-entropy loss."""
    y, p = np.asarray(y), np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    if task.kind == "binary":
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))
    if task.kind == "multiclass":
        return -np.log(p[np.arange(len(y)), y.astype(int)])
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)


HEATMAPS = "top_losses_heatmaps.png"


def top_losses(task: Task, y, probs, n: int = 9, thresholds=None) -> np.ndarray:
    """Indices of the ``n`` wrongly predicted images with the largest loss, largest first."""
    y = np.asarray(y)
    predicted = task.predicted(probs, thresholds)
    wrong = np.flatnonzero((predicted != y) if y.ndim == 1 else (predicted != y).any(axis=1))
    loss = losses(task, y, probs)
    return wrong[np.argsort(-loss[wrong], kind="stable")][:n]


def most_confused(task: Task, y, probs, n: int = 5) -> List[Tuple[str, str, int]]:
    """(true class, predicted class, count) of the most frequent confusions (multi-class)."""
    if task.kind != "multiclass":
        return []
    predicted = task.predicted(probs)
    pairs: Dict[Tuple[int, int], int] = {}
    for t, p in zip(np.asarray(y).astype(int), predicted):
        if t != p:
            pairs[(t, p)] = pairs.get((t, p), 0) + 1
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [(task.class_names[t], task.class_names[p], c) for (t, p), c in ranked]


def _caption(task: Task, y, probs, i: int) -> str:
    names = task.class_names
    if task.kind == "binary":
        return f"true {names[int(y[i])]}, P({names[1]}) = {probs[i]:.3f}"
    if task.kind == "multiclass":
        guess = int(np.argmax(probs[i]))
        return f"true {names[int(y[i])]}\npredicted {names[guess]} ({probs[i][guess]:.2f})"
    true = " ".join(n for n, v in zip(names, y[i]) if v) or "-"
    guess = " ".join(n for n, v in zip(names, probs[i] >= 0.5) if v) or "-"
    return f"true {true}\npredicted {guess}"


def write_all(folder: str, paths: Sequence[str], y, probs, task: Task, what: str,
              prefix: str = "", explain=None) -> Dict[str, str]:
    """The three PNGs into ``folder`` as ``<prefix>confusion_matrix.png`` etc.; ``what``
    names the model and the images in every title ("final model, validation").
    ``explain`` (paths, predicted class indices -> heatmaps): the top losses also as
    ``<prefix>top_losses_heatmaps.png``, where the model looked for the class it wrongly
    gave each photo.

    ROC needs two classes; with one class only the other two are drawn.
    """
    os.makedirs(folder or ".", exist_ok=True)
    y, probs = np.asarray(y), np.asarray(probs)
    title = f"{what}, {len(y)} images"
    out = {}
    if task.kind != "multilabel":
        names = task.class_names
        out["confusion matrix"] = plots.confusion_matrix(
            y.astype(int), task.predicted(probs), names,
            os.path.join(folder, prefix + FILES[0]), f"Confusion matrix: {title}")
    if len(np.unique(y if y.ndim == 1 else y.argmax(axis=1))) >= 2:
        out["ROC"] = plots.roc(y, probs, task.class_names, os.path.join(folder, prefix + FILES[1]),
                               f"ROC: {title}")
    order = top_losses(task, y, probs)
    captions = [_caption(task, y, probs, i) for i in order]
    heading = (f"Top losses: the {len(order)} wrongly predicted images with the largest loss "
               f"({title})")
    out["top losses"] = plots.gallery(paths, order, captions,
                                      os.path.join(folder, prefix + FILES[2]), heading,
                                      empty="no errors")
    if explain is not None and len(order):
        wrong = np.asarray(probs)[order]
        given = (wrong.argmax(axis=1) if wrong.ndim == 2 else (wrong >= 0.5).astype(int))
        out["top losses heatmaps"] = plots.gallery(
            paths, order, captions, os.path.join(folder, prefix + HEATMAPS),
            heading + "\nwhere the model looked for the class it gave (Grad-CAM)",
            heatmaps=explain([paths[i] for i in order], given))
    return out
