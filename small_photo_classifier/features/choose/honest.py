"""Honest held-out predictions of a model whose epoch was chosen on the same images.

A fit that keeps its best validation epoch is scored optimistically on those
validation images: the epoch was picked because it scored well there. Cross-fitting
the choice removes that: the validation images are split into K stratified parts, and
each part gets the predictions of the epoch that scores best on the *other* parts.
Every image's prediction then comes from an epoch its own label did not choose, so
their score estimates what "train, then keep the best validation epoch" gives on new
photos (the same idea as nested cross-validation, over epochs only; it needs no more
training, only each epoch's validation predictions).
"""

from typing import Sequence

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from small_photo_classifier.features.task import Task

PARTS = 5


def parts(task: Task, y, seed: int = 0, k: int = PARTS, groups=None) -> list:
    """K disjoint index arrays covering the ``len(y)`` images, stratified by class when
    every class allows it; with ``groups``, each group's images in one part (photos of
    one plant choosing the epoch for each other would be the leak this undoes)."""
    y = np.asarray(y)
    k = max(2, min(k, len(y)))
    if groups is not None:
        names, index = np.unique(np.asarray(groups), return_inverse=True)
        k = max(2, min(k, len(names)))
        split = (StratifiedGroupKFold(k, shuffle=True, random_state=seed)
                 if task.kind != "multilabel" else GroupKFold(k))
        labels = y.astype(int) if task.kind != "multilabel" else np.zeros(len(y))
        return [va for _, va in split.split(np.zeros(len(y)), labels, index) if len(va)]
    if task.kind != "multilabel":
        labels = y.astype(int)
        counts = np.bincount(labels)
        if counts[counts > 0].min() >= k:
            split = StratifiedKFold(k, shuffle=True, random_state=seed)
            return [va for _, va in split.split(np.zeros(len(y)), labels)]
    return [va for _, va in KFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)))]


def cross_fit(task: Task, y, epoch_probs: Sequence, seed: int = 0, k: int = PARTS,
              by: str = "headline", groups=None):
    """(probabilities, the epoch index each part's rows came from): for each part of the
    images, the predictions of the epoch (index into ``epoch_probs``) with the best score
    on the other parts: the task's headline metric, or (``by="loss"``) the lowest log
    loss, as the fit that is mirrored chose its epoch. Ties go to the earlier epoch, as
    the fits' own choice does. ``groups``: see `parts`."""
    y = np.asarray(y)
    stacked = np.asarray([np.asarray(p, np.float64) for p in epoch_probs])
    out = np.zeros(stacked.shape[1:], np.float64)
    chosen = []
    for part in parts(task, y, seed, k, groups):
        rest = np.setdiff1d(np.arange(len(y)), part)
        scores = [-task.scores(y[rest], p[rest])["loss"] if by == "loss" else
                  task.headline_score(y[rest], p[rest]) for p in stacked]
        scores = np.where(np.isfinite(scores), scores, -np.inf)
        best = int(np.argmax(scores))
        out[part] = stacked[best][part]
        chosen.append(best)
    return out, chosen
