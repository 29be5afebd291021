"""Cross-validation on cached features: folds, per-epoch fold scores, and what CV keeps.

Every fold trains through the one `training.HeadTrainer` (compiled once per
configuration) from the same starting weights, and is scored exactly after every
epoch. The epoch with the best mean score over the folds is chosen. What cross-
validation keeps of every epoch is small: each fold's held-out probabilities, from
which each row's out-of-fold probabilities at the chosen epoch are taken (an honest
estimate of the chosen configuration, used to compare a single model with the bag,
and to find labels that look wrong).

The folds' weights (the bag's members) are needed only for the scenario that is
exported, and only at the chosen epoch: `fold_weights` trains each fold again for
that many epochs, which gives the same weights (the same seed, the same batch order
for every epoch, a fresh optimizer), instead of holding every fold's weights at
every epoch until the choice (VGG16's scenario C: 55 MB a copy, 25 copies).
"""

import dataclasses
import os
import warnings
from typing import List, Optional, Tuple

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from small_photo_classifier.features.store import rows as rows_lib
from small_photo_classifier.features.fit.settings import FitSettings
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.task import Task
from small_photo_classifier.features.fit.loop import HeadTrainer, restore, snapshot
from small_photo_classifier.pipeline import split
from small_photo_classifier.pipeline.errors import ConfigError

Folds = List[Tuple[np.ndarray, np.ndarray]]


def stratify_key(task: Task, y) -> np.ndarray:
    """One integer per row to stratify on: the class, or (multi-label) the label set."""
    y = np.asarray(y)
    if task.kind != "multilabel":
        return y.astype(int)
    return np.array([int("".join(map(str, row)) or "0", 2) for row in y.astype(int)])


def make_folds(y, folds: int, seed: int, task: Optional[Task] = None,
               groups=None) -> Folds:
    """Stratified K-fold (train, validation) index pairs, shuffled by ``seed``.

    Multi-label rows are split by iterative stratification (`iterative_folds`),
    which keeps every label's share about equal in each fold. With ``groups`` (one
    name per row, `pipeline.groups`), every group's rows are in one fold: scikit-learn's
    ``StratifiedGroupKFold`` (multi-label: iterative stratification of whole groups).
    """
    y = np.asarray(y)
    if groups is not None:
        return _group_folds(y, folds, seed, task, np.asarray(groups))
    if task is not None and task.kind == "multilabel":
        return iterative_folds(y, folds, seed)
    labels = y.astype(int)
    smallest, count = task_lib.smallest_class(task, labels)
    if folds < 2 or count < folds:
        name = (f"class {task.class_names[smallest]!r}" if task is not None
                else "the smallest class")
        raise ConfigError(f"--cv_folds={folds} needs at least 2 folds and at least {folds} "
                          f"training images in each class ({name} has {count}); "
                          "pass a smaller --cv_folds, or 0 to choose by the validation set.")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _group_folds(y, folds: int, seed: int, task: Optional[Task], groups) -> Folds:
    names, index = np.unique(groups, return_inverse=True)
    if folds < 2 or len(names) < folds:
        raise ConfigError(
            f"{folds}-fold cross-validation keeps each group of photos in one fold, and the "
            f"training split has {len(names)} group(s): a fold needs at least one. Pass "
            f"--cv_folds={max(2, len(names))} or fewer (at least 2), or 0 to choose by the "
            "validation set; or name finer groups.")
    if task is not None and task.kind == "multilabel":
        per_group = np.zeros((len(names), y.shape[1]), int)
        np.maximum.at(per_group, index, y.astype(int))
        sizes = [len(names) // folds + (1 if k < len(names) % folds else 0)
                 for k in range(folds)]
        part = split.iterative_assign(per_group, sizes, seed)[index]
        return [(np.flatnonzero(part != f), np.flatnonzero(part == f)) for f in range(folds)]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = list(splitter.split(np.zeros(len(y)), y.astype(int), index))
    empty = [k for k, (_, va) in enumerate(out) if not len(va)]
    if empty:
        raise ConfigError(f"{folds}-fold cross-validation with whole groups left fold(s) "
                          f"{empty} empty: pass a smaller --cv_folds or name finer groups.")
    return out


def iterative_folds(y, folds: int, seed: int) -> Folds:
    """K folds of multi-label rows by iterative stratification (`pipeline.split`)."""
    y = np.asarray(y).astype(int)
    if folds < 2 or len(y) < folds:
        raise ConfigError(f"--cv_folds={folds} needs at least 2 folds and {folds} images.")
    sizes = [len(y) // folds + (1 if k < len(y) % folds else 0) for k in range(folds)]
    part = split.iterative_assign(y, sizes, seed)
    return [(np.flatnonzero(part != f), np.flatnonzero(part == f)) for f in range(folds)]


@dataclasses.dataclass
class CVResult:
    """Cross-validation of one configuration."""
    curves: np.ndarray                 # [folds, epochs] headline score per fold and epoch
    epoch: int                         # the chosen epoch (1-based)
    metric: str                        # what the curves are (the task's headline)
    oof_probs: np.ndarray              # out-of-fold probabilities at the chosen epoch
    fold_scores: List[dict]            # every metric of each fold at the chosen epoch
    limit: Optional[int] = None        # the most epochs the folds were allowed

    @property
    def at_limit(self) -> bool:
        """The chosen epoch is the last one allowed: the score was still improving there."""
        return self.limit is not None and self.epoch >= self.limit

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.curves[:, self.epoch - 1]))

    @property
    def std(self) -> float:
        return float(np.nanstd(self.curves[:, self.epoch - 1]))

    def summary(self) -> dict:
        """What metrics.json stores under ``cross_validation`` (binary keys unchanged)."""
        name = self.metric
        at = self.curves[:, self.epoch - 1]
        others = {k: [s[k] for s in self.fold_scores] for k in
                  (self.fold_scores[0] if self.fold_scores else {}) if k != name}
        return {"epoch": self.epoch, f"{name}_mean": self.mean, f"{name}_std": self.std,
                f"fold_{name}s": [round(float(a), 6) for a in at],
                "folds": int(self.curves.shape[0]), "epochs_trained": int(self.curves.shape[1]),
                "epochs_allowed": self.limit, "still_improving_at_limit": self.at_limit,
                f"mean_{name}_per_epoch": [round(float(m), 6)
                                          for m in np.nanmean(self.curves, axis=0)],
                "other_metrics_at_epoch": {k: {"mean": round(float(np.nanmean(v)), 6),
                                               "std": round(float(np.nanstd(v)), 6)}
                                           for k, v in others.items()}}


def best_epoch(curves: np.ndarray) -> int:
    """The epoch (1-based) with the best mean over folds (the last if all are NaN)."""
    if not np.isfinite(curves).any():
        return curves.shape[1]
    with warnings.catch_warnings():  # an epoch no fold could score is NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves, axis=0)
    return int(np.nanargmax(mean)) + 1


def last_gain(curves: np.ndarray, min_delta: float) -> int:
    """The last epoch (1-based) whose mean over folds beat every earlier epoch by at
    least ``min_delta`` (one more held-out row right): the patience counts from there,
    so a curve that creeps up by less than a photo's worth per epoch stops, while the
    epoch chosen is still the best one."""
    with warnings.catch_warnings():  # an epoch no fold could score is NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves, axis=0)
    best, last = -np.inf, 1
    for e, value in enumerate(mean, start=1):
        if np.isfinite(value) and value >= best + min_delta:
            best, last = value, e
    return last


def cross_validate(trainer: HeadTrainer, x, y, folds: Folds, settings: FitSettings, *,
                   views_x=None, progress=None) -> CVResult:
    """Trains ``trainer`` on every fold from the classifier's current weights.

    Fold k shuffles with seed ``settings.seed + k`` and adds the cached views of its own
    training images (``views_x``). With ``settings.patience`` the folds train side by
    side, a round of epochs at a time, until the mean fold score has not improved by a
    row's worth (`last_gain`) for that many epochs (or ``settings.epochs`` is reached):
    the epoch is chosen by the mean curve, as LightGBM's and XGBoost's ``cv`` do, and a
    round ends where the last gain plus the patience says a stop could come. Between rounds each fold's
    state waits (`FoldStates`); the weights are those of one uninterrupted fit (tested).
    ``progress(first, last)``, when given, returns a `pipeline.progress` bar for the round
    of epochs ``first``..``last`` (1-based), advanced once per fold. The classifier is
    left as it was found.
    """
    y = np.asarray(y)
    start = snapshot(trainer.classifier.model)
    patience, limit = settings.patience, settings.epochs
    curves, probs, scores = ([[] for _ in folds] for _ in range(3))
    done, target = 0, min(limit, patience) if patience else limit
    try:
        with FoldStates(settings.scratch_dir) as states:
            while True:
                bar = progress(done + 1, target) if progress is not None else None
                for k, (tr, va) in enumerate(folds):
                    restore(trainer.classifier.model, start)
                    if done:
                        trainer.set_state(states.get(k))
                    x_tr, y_tr = rows_lib.with_views(x, y, views_x, tr)
                    fit = trainer.fit(x_tr, y_tr, settings.replace(seed=settings.seed + k,
                                                                   epochs=target),
                                      val=(rows_lib.take(x, va), y[va]), keep=None,
                                      record=("probs",), first_epoch=done)
                    del x_tr  # a fold's rows are not kept once it is trained
                    curves[k] += [s[trainer.task.headline] for s in fit.val_scores]
                    probs[k] += fit.val_probs
                    scores[k] += fit.val_scores
                    if target < limit:
                        states.put(k, trainer.state())
                    if bar is not None:
                        bar.add(1)
                done = target
                chosen = best_epoch(np.asarray(curves, np.float64))
                last = last_gain(np.asarray(curves, np.float64), 1.0 / max(1, len(y)))
                if (not patience or done >= limit or done - last >= patience
                        or not np.isfinite(curves).any()):
                    break
                target = min(limit, last + patience)
        curves = np.asarray(curves, np.float64)
        oof = np.zeros((len(y), *np.shape(probs[0][0])[1:]), np.float64)
        for (_, va), fold_probs in zip(folds, probs):
            oof[va] = fold_probs[chosen - 1]
    finally:
        restore(trainer.classifier.model, start)
    return CVResult(curves, chosen, trainer.task.headline, oof,
                    [s[chosen - 1] for s in scores], limit)


class FoldStates:
    """Each fold's training state between the rounds of a patient cross-validation:
    in memory while small, else in a temporary folder (VGG16's scenario C: its block5 and
    flattened head with Adam's two moments are 160 MB a fold, 0.8 GB for five folds,
    which a laptop should not hold for the length of a cross-validation)."""

    IN_MEMORY = 64 << 20  # bytes of one fold's state kept in memory

    def __init__(self, scratch_dir: Optional[str] = None):
        self.scratch_dir, self.folder, self.held = scratch_dir, None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.folder is not None:
            self.folder.cleanup()

    def put(self, k: int, values: list) -> None:
        if sum(v.nbytes for v in values) <= self.IN_MEMORY:
            self.held[k] = values
            return
        if self.folder is None:
            import tempfile
            if self.scratch_dir:
                os.makedirs(self.scratch_dir, exist_ok=True)
            self.folder = tempfile.TemporaryDirectory(prefix="cv_folds_", dir=self.scratch_dir)
        path = os.path.join(self.folder.name, f"fold{k}.npz")
        np.savez(path, *values)
        self.held[k] = path

    def get(self, k: int) -> list:
        held = self.held[k]
        if isinstance(held, str):
            with np.load(held) as data:
                return [data[f"arr_{i}"] for i in range(len(data.files))]
        return held


def fold_weights(trainer: HeadTrainer, x, y, folds: Folds, settings: FitSettings,
                 epoch: int, *, views_x=None) -> List[list]:
    """Each fold's trainable weights after ``epoch`` epochs, as `cross_validate` trained
    them: the same seed and rows per fold, the same batch order in every epoch (it
    depends on the epoch's number only), a fresh optimizer. The classifier is left as
    it was found."""
    y = np.asarray(y)
    start = snapshot(trainer.classifier.model)
    out = []
    try:
        for k, (tr, _) in enumerate(folds):
            restore(trainer.classifier.model, start)
            x_tr, y_tr = rows_lib.with_views(x, y, views_x, tr)
            trainer.fit(x_tr, y_tr, settings.replace(seed=settings.seed + k, epochs=epoch),
                        keep=None)
            out.append([np.array(v.numpy()) for v in trainer.trainable])
    finally:
        restore(trainer.classifier.model, start)
    return out


def format_cv(result: CVResult, metric_label: Optional[str] = None) -> str:
    """``5-fold CV AUC 0.9758 +- 0.0102`` for logs and summaries."""
    label = metric_label or {"auc": "AUC", "accuracy": "accuracy", "map": "mAP"}.get(
        result.metric, result.metric)
    return (f"{result.curves.shape[0]}-fold CV {label} {result.mean:.4f} +- "
            f"{result.std:.4f}")


def fold_of(folds: Folds, n: int) -> np.ndarray:
    """Which fold validates each of the ``n`` rows."""
    out = np.full(n, -1)
    for k, (_, va) in enumerate(folds):
        out[va] = k
    return out
