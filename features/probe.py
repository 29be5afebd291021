"""The linear probe: the baseline every heads stage is compared with.

A scikit-learn logistic regression on globally average-pooled ``block5_pool``
features (512 numbers per image, standardised), its inverse regularisation
strength C chosen by an inner stratified cross-validation on ROC AUC. It is
the simplest sound use of frozen features; a deep head that cannot beat it
adds nothing, so every run reports both side by side.
"""

import dataclasses
import logging
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features.heads import binary_scores

# Inverse regularisation strengths searched by the inner CV (1e-4 .. 1e2).
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))
PROBE_LAYER = "block5_pool"


def pooled(features, chunk: int = 256) -> np.ndarray:
    """Global average pooling of [N, H, W, C] feature maps to [N, C] (2-D input passes).

    Streamed features (`cache.H5Rows`) are pooled ``chunk`` rows at a time, so only
    the [N, C] result is ever in memory.
    """
    if not isinstance(features, np.ndarray) and len(features.shape) == 4:
        return np.concatenate([np.asarray(features[i:i + chunk], np.float32).mean(axis=(1, 2))
                               for i in range(0, len(features), chunk)]) if len(features) \
            else np.zeros([0, features.shape[-1]], np.float32)
    features = np.asarray(features, np.float32)
    return features.mean(axis=(1, 2)) if features.ndim == 4 else features


@dataclasses.dataclass
class ProbeResult:
    """A fitted probe's score on held-out images."""
    auc: float
    accuracy: float
    c: float


def fit(x: np.ndarray, y, seed: int = 0, inner_folds: int = 5):
    """Fits the probe on pooled features ``x``; returns the fitted scikit-learn estimator.

    The inner CV uses at most as many folds as the smaller class has images.
    """
    y = np.asarray(y).astype(int)
    folds = int(min(inner_folds, np.bincount(y, minlength=2).min()))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    if folds < 2:  # too few images to choose C: keep scikit-learn's default C=1
        return pipe.fit(x, y)
    search = GridSearchCV(pipe, {"logisticregression__C": list(C_GRID)}, scoring="roc_auc",
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    with warnings.catch_warnings():
        # Weakly regularised fits on separable features may stop at max_iter; the
        # inner CV judges them on held-out AUC like any other candidate.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return search.fit(x, y)


def chosen_c(estimator) -> float:
    """The C the inner CV picked (1.0 when there was no search)."""
    params = getattr(estimator, "best_params_", None)
    return float(params["logisticregression__C"]) if params else 1.0


def evaluate(x_train, y_train, x_val, y_val, seed: int = 0) -> ProbeResult:
    """Fits on the training images and scores ROC AUC / accuracy on the validation ones."""
    estimator = fit(x_train, y_train, seed)
    auc, accuracy = binary_scores(y_val, estimator.predict_proba(x_val)[:, 1])
    return ProbeResult(auc, accuracy, chosen_c(estimator))


def cross_validate(x, y, folds: Sequence[Tuple[np.ndarray, np.ndarray]],
                   seed: int = 0) -> Dict[str, object]:
    """The probe's AUC on each (train, validation) index pair of ``folds``: mean, std, list."""
    y = np.asarray(y)
    aucs = [evaluate(x[tr], y[tr], x[va], y[va], seed).auc for tr, va in folds]
    return {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
            "fold_aucs": [round(a, 6) for a in aucs], "folds": len(folds)}


def run(train_feats: Dict[str, np.ndarray], y_train, val_feats: Dict[str, np.ndarray], y_val,
        folds: Optional[Sequence] = None, seed: int = 0) -> dict:
    """The probe of one heads stage: scored on the validation set and, given ``folds``
    (index pairs into the training set), cross-validated on the same folds as the heads.

    Returns the dict stored under ``metrics.json``'s ``probe`` key.
    """
    x_train = pooled(train_feats[PROBE_LAYER])
    x_val = pooled(val_feats[PROBE_LAYER])
    result = evaluate(x_train, y_train, x_val, y_val, seed)
    out = {"val_auc": round(result.auc, 6), "val_accuracy": round(result.accuracy, 6),
           "C": result.c, "features": f"global average of {PROBE_LAYER}",
           "model": "StandardScaler + LogisticRegression (C by inner stratified CV on AUC)"}
    if folds:
        cv = cross_validate(x_train, y_train, folds, seed)
        out.update({"cv_auc_mean": round(cv["auc_mean"], 6), "cv_auc_std": round(cv["auc_std"], 6),
                    "cv_fold_aucs": cv["fold_aucs"]})
    logging.info("Linear probe (logistic regression on pooled %s, C=%g): val AUC %.4f%s",
                 PROBE_LAYER, result.c, result.auc,
                 f", {len(folds)}-fold CV AUC {out['cv_auc_mean']:.4f} +- "
                 f"{out['cv_auc_std']:.4f}" if folds else "")
    return out
