"""The linear probe: the baseline every heads stage is compared with, and a candidate.

A scikit-learn logistic regression on frozen ``block5_pool`` features. How the
features are pooled (global average, global max, or flattened), whether they are
standardised, and the inverse regularisation strength C are chosen by
cross-validation on the training photos alone: on the cross-validation folds of
the heads when the run has them (so the probe and the heads are scored on the
same folds), else on an inner stratified 5-fold split. Measured on held-out
photos, unscaled features beat standardised ones on every set tried
(docs/benchmarks.md), which is why scaling is a choice and not a given.

Multi-class tasks get the multinomial model, multi-label ones one model per
label. `keras_head` turns a fitted probe into a small Keras head (pooling,
optional standardisation, one Dense layer) over the frozen conv base, so a probe
that wins can be exported and used by predict.py like any other model.
"""

import dataclasses
import logging
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from features.choose import cv as cv_lib
from features import scenarios
from features import task as task_lib
from features.task import Task
from pipeline import progress as progress_lib

PROBE_LAYER = scenarios.BLOCK5_POOL
POOLINGS = ("average", "max", "flatten")
# Inverse regularisation strengths searched (1e-4 .. 1e2).
C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
INNER_FOLDS = 5


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """One probe variant: pooling, standardisation, C."""
    pooling: str = "average"
    scaled: bool = False
    c: float = 1.0

    def describe(self) -> str:
        return f"{self.pooling} pooling, {'standardised' if self.scaled else 'raw'}, C={self.c:g}"


def pooled(features, how: str = "average", chunk: int = 256) -> np.ndarray:
    """[N, H, W, C] feature maps to [N, D]: global average, global max, or flattened.
    2-D input passes. Streamed features (`rows.H5Rows`) are pooled ``chunk`` rows at a
    time, so only the [N, D] result is ever in memory."""
    def one(block):
        block = np.asarray(block, np.float32)
        if block.ndim != 4:
            return block
        if how == "average":
            return block.mean(axis=(1, 2))
        if how == "max":
            return block.max(axis=(1, 2))
        return block.reshape(len(block), -1)
    if isinstance(features, np.ndarray):
        return one(features)
    parts = [one(features[i:i + chunk]) for i in range(0, len(features), chunk)]
    return np.concatenate(parts) if parts else np.zeros([0, features.shape[-1]], np.float32)


class RowSpace(BaseEstimator, TransformerMixin):
    """Coordinates in the span of the training rows: X -> X V, with V an orthonormal
    basis of that span.

    An L2-penalised logistic regression's weights lie in the span of its training rows
    (the gradient of its loss is a combination of them), so fitting it on X V with the
    same C gives exactly the weights V z of the fit on X, with z the fit on X V. With a
    few hundred images and 25,088 flattened features that turns a 30 s fit into a
    fraction of a second; `keras_head` maps the weights back (V z).

    V comes from the N x N Gram matrix X X^T = U S^2 U^T as V = X^T U S^-1 (directions
    with S^2 under 1e-10 of the largest dropped: they carry no data), which costs two
    N x N x D products: 6-9x less than the thin SVD of X it replaces at N = 800-1,700
    and D = 25,088 (bench/bench_probe.py).
    """

    def fit(self, x, y=None):
        x = np.asarray(x, np.float64)
        eigenvalues, u = np.linalg.eigh(x @ x.T)
        keep = eigenvalues > eigenvalues[-1] * 1e-10
        self.basis_ = (x.T @ u[:, keep]) / np.sqrt(eigenvalues[keep])
        return self

    def transform(self, x):
        return np.asarray(x, np.float64) @ self.basis_


def _estimator(task: Task, config: ProbeConfig, class_weight: Optional[dict]):
    weights = None
    if class_weight and task.kind != "multilabel":
        weights = {c: w for c, w in class_weight.items()}
    model = LogisticRegression(C=config.c, max_iter=2000, class_weight=weights)
    if task.kind == "multilabel":
        model = OneVsRestClassifier(model)
    steps = [StandardScaler()] if config.scaled else []
    if config.pooling == "flatten":
        steps.append(RowSpace())
    return make_pipeline(*steps, model)


def fit(x: np.ndarray, y, task: Task, config: ProbeConfig, class_weight=None):
    """Fits one probe variant on pooled features ``x``; returns the scikit-learn pipeline."""
    with warnings.catch_warnings():
        # Weakly regularised fits on separable features may stop at max_iter; the
        # cross-validation judges them on held-out data like any other candidate.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _estimator(task, config, class_weight).fit(x, np.asarray(y).astype(int))


def probabilities(estimator, x, task: Task) -> np.ndarray:
    """The probe's probabilities in the task's shape ([N] binary, else [N, K])."""
    probs = estimator.predict_proba(x)
    return probs[:, 1] if task.kind == "binary" else probs


@dataclasses.dataclass
class Choice:
    """The probe variant chosen by cross-validation, with its fold scores."""
    config: ProbeConfig
    fold_scores: List[float]
    oof_probs: np.ndarray
    tried: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_scores))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_scores))


def choose(features, y, task: Task, folds: Optional[Sequence] = None, seed: int = 0,
           class_weight=None, poolings: Sequence[str] = POOLINGS,
           progress: bool = False) -> Choice:
    """Scores every pooling x standardisation x C on ``folds`` (default: an inner
    stratified 5-fold split of these rows) and returns the best by mean score; with
    ``progress``, a progress bar counts the fits."""
    y = np.asarray(y)
    if folds is None:
        _, smallest = task_lib.smallest_class(task, y)
        folds = cv_lib.make_folds(y, max(2, min(INNER_FOLDS, smallest)), seed, task)
    best, tried = None, 0
    bar = (progress_lib.bar(len(poolings) * 2 * len(C_GRID) * len(folds), "fit",
                            "linear probe") if progress else None)
    for how in poolings:
        x = pooled(features, how)
        for scaled in (False, True):
            # The transforms (standardisation, row space) depend on the fold, not on C:
            # fitted once per fold, shared by every C.
            prepared = []
            for tr, va in folds:
                steps = _estimator(task, ProbeConfig(how, scaled), class_weight).steps[:-1]
                x_tr, x_va = x[tr], x[va]
                for _, step in steps:
                    x_tr = step.fit_transform(x_tr)
                    x_va = step.transform(x_va)
                prepared.append((tr, va, x_tr, x_va))
            for c in C_GRID:
                config = ProbeConfig(how, scaled, c)
                scores = []
                oof = np.zeros((len(y), *((task.units,) if task.units > 1 else ())))
                for tr, va, x_tr, x_va in prepared:
                    # A fresh fit per C: warm-starting along the C path was 1.3x faster
                    # but moved near-ties between Cs (weakly regularised fits stop at
                    # max_iter where they start from), so choices would depend on order.
                    model = _estimator(task, config, class_weight).steps[-1][1]
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ConvergenceWarning)
                        model.fit(x_tr, y[tr].astype(int))
                    probs = model.predict_proba(x_va)
                    oof[va] = probs[:, 1] if task.kind == "binary" else probs
                    scores.append(task.scores(y[va], oof[va])[task.headline])
                    if bar is not None:
                        bar.add(1)
                tried += 1
                if best is None or np.mean(scores) > np.mean(best.fold_scores) + 1e-12:
                    best = Choice(config, scores, oof, 0)
    best.tried = tried
    return best


def run(train_feats: Dict[str, object], y_train, val_feats: Dict[str, object], y_val,
        task: Task, folds: Optional[Sequence] = None, seed: int = 0, class_weight=None):
    """The probe of one heads stage: the variant chosen by CV on the training split
    (on ``folds``, the heads' folds, when given), fitted on the whole split, scored on
    the validation set. The feature dicts are keyed by layer; the probe reads the
    backbone's feature map (`PROBE_LAYER` for VGG16; the one feature-map key otherwise). Returns (the dict stored under ``metrics.json``'s ``probe`` key,
    the chosen `Choice`, the fitted estimator)."""
    layer = PROBE_LAYER if PROBE_LAYER in train_feats else feature_map_key(train_feats)
    choice = choose(train_feats[layer], y_train, task, folds, seed, class_weight,
                    progress=True)
    x_train = pooled(train_feats[layer], choice.config.pooling)
    estimator = fit(x_train, y_train, task, choice.config, class_weight)
    val = task.scores(y_val, probabilities(
        estimator, pooled(val_feats[layer], choice.config.pooling), task))
    name = task.headline
    out = {**{f"val_{k}": round(v, 6) for k, v in val.items()}, "C": choice.config.c,
           "pooling": choice.config.pooling, "standardised": choice.config.scaled,
           "features": f"{choice.config.pooling} of {layer}",
           "model": f"LogisticRegression ({choice.config.describe()}; chosen among "
                    f"{choice.tried} variants by CV on the training split)"}
    if folds:
        out.update({f"cv_{name}_mean": round(choice.mean, 6),
                    f"cv_{name}_std": round(choice.std, 6),
                    f"cv_fold_{name}s": [round(float(s), 6) for s in choice.fold_scores]})
    logging.info("Linear probe (%s): val %s %.4f%s", choice.config.describe(), name, val[name],
                 f", {len(folds)}-fold CV {name} {choice.mean:.4f} +- {choice.std:.4f}"
                 if folds else "")
    return out, choice, estimator


def feature_map_key(feats: Dict[str, object]) -> str:
    """The key of the last cached layer (the feature map: caches hold the stem layer
    first, then the feature map)."""
    return list(feats)[-1]


def cross_validate(x, y, folds: Sequence, task: Task, seed: int = 0,
                   config: ProbeConfig = ProbeConfig()) -> Dict[str, object]:
    """One probe variant's headline score on each (train, validation) index pair."""
    y = np.asarray(y)
    name = task.headline
    scores = [task.scores(y[va], probabilities(fit(x[tr], y[tr], task, config), x[va],
                                               task))[name] for tr, va in folds]
    return {f"{name}_mean": float(np.mean(scores)), f"{name}_std": float(np.std(scores)),
            f"fold_{name}s": [round(a, 6) for a in scores], "folds": len(folds)}


def keras_head(estimator, config: ProbeConfig, task: Task, input_shape, name: str = "probe"):
    """The fitted probe as a Keras model from ``block5_pool`` features: pooling (or
    flatten), the standardisation when it has one (a Normalization layer), and one
    Dense layer with the regression's weights and the task's activation. Plain layers
    only, so a model built on it loads with ``safe_mode=True``."""
    import keras
    steps = dict(estimator.named_steps)
    model = steps.get("logisticregression") or steps.get("onevsrestclassifier")
    if isinstance(model, OneVsRestClassifier):
        coef = np.concatenate([m.coef_ for m in model.estimators_])
        intercept = np.concatenate([m.intercept_ for m in model.estimators_])
    else:
        coef, intercept = model.coef_, model.intercept_
    if "rowspace" in steps:  # weights fitted in the training rows' span: back to features
        coef = coef @ steps["rowspace"].basis_.T
    if coef.shape[0] != task.units:  # two classes as --task=multiclass: softmax([0, z])
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros_like(intercept), intercept])
    inputs = keras.Input(input_shape, name=f"{name}_features")
    pool = {"average": keras.layers.GlobalAveragePooling2D, "max":
            keras.layers.GlobalMaxPooling2D, "flatten": keras.layers.Flatten}[config.pooling]
    x = pool(name=f"{name}_pool", dtype="float32")(inputs)
    if config.scaled:
        scaler = steps["standardscaler"]
        x = keras.layers.Normalization(mean=scaler.mean_, variance=scaler.var_,
                                       name=f"{name}_standardise", dtype="float32")(x)
    dense = keras.layers.Dense(coef.shape[0], activation=task.activation, dtype="float32",
                               name=f"{name}_predictions")
    outputs = dense(x)
    dense.set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    return keras.Model(inputs, outputs, name=name)
