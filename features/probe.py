"""The linear probe: the baseline every heads stage is compared with.

A scikit-learn logistic regression on globally average-pooled ``block5_pool``
features (512 numbers per image, standardised), its inverse regularisation
strength C chosen by an inner stratified cross-validation. It is the simplest
sound use of frozen features; a deep head that cannot beat it adds nothing, so
every run reports both side by side. Multi-class tasks get the multinomial
model, multi-label ones one model per label.
"""

import logging
import warnings
from typing import Dict, Optional, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features import cv as cv_lib, scenarios
from features.task import Task

# Inverse regularisation strengths searched by the inner CV (1e-4 .. 1e2).
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))
PROBE_LAYER = scenarios.BLOCK5_POOL
_SCORING = {"binary": "roc_auc", "multiclass": "neg_log_loss", "multilabel": "average_precision"}


def pooled(features, chunk: int = 256) -> np.ndarray:
    """Global average pooling of [N, H, W, C] feature maps to [N, C] (2-D input passes).

    Streamed features (`rows.H5Rows`) are pooled ``chunk`` rows at a time, so only
    the [N, C] result is ever in memory.
    """
    if not isinstance(features, np.ndarray) and len(features.shape) == 4:
        return np.concatenate([np.asarray(features[i:i + chunk], np.float32).mean(axis=(1, 2))
                               for i in range(0, len(features), chunk)]) if len(features) \
            else np.zeros([0, features.shape[-1]], np.float32)
    features = np.asarray(features, np.float32)
    return features.mean(axis=(1, 2)) if features.ndim == 4 else features


def fit(x: np.ndarray, y, task: Task, seed: int = 0, inner_folds: int = 5):
    """Fits the probe on pooled features ``x``; returns the fitted scikit-learn estimator.

    The inner CV uses at most as many folds as the smallest class has images.
    """
    y = np.asarray(y).astype(int)
    model = LogisticRegression(max_iter=5000)
    if task.kind == "multilabel":
        model = OneVsRestClassifier(model)
        param = "onevsrestclassifier__estimator__C"
        smallest = int(min(y.sum(axis=0).min(), (1 - y).sum(axis=0).min()))
        splitter_y = cv_lib.stratify_key(task, y)
    else:
        param = "logisticregression__C"
        counts = np.bincount(y)
        smallest = int(counts[counts > 0].min())
        splitter_y = y
    pipe = make_pipeline(StandardScaler(), model)
    folds = int(min(inner_folds, smallest))
    if folds < 2:  # too few images to choose C: keep scikit-learn's default C=1
        return pipe.fit(x, y)
    inner = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        x, splitter_y if task.kind != "multilabel" else np.zeros(len(y))))
    search = GridSearchCV(pipe, {param: list(C_GRID)}, scoring=_SCORING[task.kind], cv=inner)
    with warnings.catch_warnings():
        # Weakly regularised fits on separable features may stop at max_iter; the
        # inner CV judges them on held-out data like any other candidate.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return search.fit(x, y)


def chosen_c(estimator) -> float:
    """The C the inner CV picked (1.0 when there was no search)."""
    params = getattr(estimator, "best_params_", None)
    return float(next(iter(params.values()))) if params else 1.0


def probabilities(estimator, x, task: Task) -> np.ndarray:
    """The probe's probabilities in the task's shape ([N] binary, else [N, K])."""
    probs = estimator.predict_proba(x)
    return probs[:, 1] if task.kind == "binary" else probs


def evaluate(x_train, y_train, x_val, y_val, task: Task, seed: int = 0) -> dict:
    """Fits on the training images and scores the validation ones (plus ``C``)."""
    estimator = fit(x_train, y_train, task, seed)
    return {**task.scores(y_val, probabilities(estimator, x_val, task)),
            "C": chosen_c(estimator)}


def cross_validate(x, y, folds: Sequence, task: Task, seed: int = 0) -> Dict[str, object]:
    """The probe's headline score on each (train, validation) index pair: mean, std, list."""
    y = np.asarray(y)
    name = task.headline
    scores = [evaluate(x[tr], y[tr], x[va], y[va], task, seed)[name] for tr, va in folds]
    return {f"{name}_mean": float(np.mean(scores)), f"{name}_std": float(np.std(scores)),
            f"fold_{name}s": [round(a, 6) for a in scores], "folds": len(folds)}


def run(train_feats: Dict[str, object], y_train, val_feats: Dict[str, object], y_val,
        task: Task, folds: Optional[Sequence] = None, seed: int = 0) -> dict:
    """The probe of one heads stage: scored on the validation set and, given ``folds``
    (index pairs into the training set), cross-validated on the same folds as the heads.

    Returns the dict stored under ``metrics.json``'s ``probe`` key.
    """
    x_train = pooled(train_feats[PROBE_LAYER])
    x_val = pooled(val_feats[PROBE_LAYER])
    result = evaluate(x_train, y_train, x_val, y_val, task, seed)
    name = task.headline
    out = {**{f"val_{k}": round(v, 6) for k, v in result.items() if k != "C"},
           "C": result["C"], "features": f"global average of {PROBE_LAYER}",
           "model": "StandardScaler + LogisticRegression (C by inner stratified CV)"}
    if folds:
        cv = cross_validate(x_train, y_train, folds, task, seed)
        out.update({f"cv_{name}_mean": round(cv[f"{name}_mean"], 6),
                    f"cv_{name}_std": round(cv[f"{name}_std"], 6),
                    f"cv_fold_{name}s": cv[f"fold_{name}s"]})
    logging.info("Linear probe (logistic regression on pooled %s, C=%g): val %s %.4f%s",
                 PROBE_LAYER, result["C"], name, result[name],
                 f", {len(folds)}-fold CV {name} {out[f'cv_{name}_mean']:.4f} +- "
                 f"{out[f'cv_{name}_std']:.4f}" if folds else "")
    return out
