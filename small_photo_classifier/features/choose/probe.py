"""The linear probe: the baseline every heads stage is compared with, and a candidate.

A logistic regression (scikit-learn's ``LogisticRegression`` model, fitted along the
C path by `features.choose.linear`) on the backbone's frozen feature map. How the
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
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from small_photo_classifier.features.choose import cv as cv_lib, linear
from small_photo_classifier.features import scenarios
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.task import Task
from small_photo_classifier.pipeline import progress as progress_lib

PROBE_LAYER = scenarios.BLOCK5_POOL
POOLINGS = ("average", "max", "flatten")
SCALINGS = (False, True)  # raw, standardised
# Variants never tried: flattened and standardised features were the worst variant by CV
# and never the best on held-out photos on ants/bees and the 12 flower species with
# VGG16 and Lite0 (docs/benchmarks.md, bench/bench_probe.py), and the costliest: each
# fold's standardisation needs its own N x N Gram matrix of 25,088-62,720 columns.
NOT_TRIED = (("flatten", True),)
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


@dataclasses.dataclass
class LinearProbe:
    """A fitted probe on pooled features: ``x -> link((x - mean) / scale @ coef.T + b)``.

    ``coef`` [K, D] and ``intercept`` [K]: one row for a binary task (or a multi-class
    task of two classes, as scikit-learn fits them), one per class (softmax) or per label
    (a sigmoid each) otherwise. ``mean``/``scale``: the standardisation, None when raw."""
    coef: np.ndarray
    intercept: np.ndarray
    link: str
    mean: Optional[np.ndarray] = None
    scale: Optional[np.ndarray] = None

    def standardise(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return x if self.mean is None else (x - self.mean) / self.scale

    def predict_proba(self, x) -> np.ndarray:
        """[N, K] probabilities (K = 1 for the binary sigmoid)."""
        return linear.probabilities(self.standardise(x), self.coef.T, self.intercept,
                                    self.link)


def _scaler(x, rows=None, block: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean and scale of ``x`` (of its ``rows``, default all; a constant
    column is scaled by 1), computed a column block at a time in float64: never a copy
    of the rows (flattened Kaggle-sized features: 420 MB a fold)."""
    mean, std = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for i in range(0, x.shape[1], block):
        part = linear.columns(x, i, block)
        part = part if rows is None else part[rows]
        mean[i:i + block], std[i:i + block] = part.mean(axis=0), part.std(axis=0)
    return mean, np.where(std < 10 * np.finfo(np.float64).eps * np.maximum(abs(mean), 1),
                          1.0, std)


def _coordinates(x, scaler=None) -> np.ndarray:
    """The rows of ``x`` (standardised by ``scaler``) in the coordinates the solver
    works in: their row space (`linear.row_space`) when the features are wider than the
    rows, else the features themselves."""
    if x.shape[1] <= len(x):
        return linear.columns(x, 0, x.shape[1], scaler)
    return linear.row_space(x, scaler)


def fit(x: np.ndarray, y, task: Task, config: ProbeConfig, class_weight=None) -> LinearProbe:
    """Fits one probe variant on pooled features ``x`` (the same optimum as scikit-learn's
    ``LogisticRegression(C)``, see `features.choose.linear`)."""
    x, y = np.asarray(x), np.asarray(y)
    targets, link = linear.targets_of(task.kind, y, len(task.class_names))
    scaler = _scaler(x) if config.scaled else None
    weights = linear.sample_weights(task.kind, y, class_weight)
    with linear.single_thread():
        z = _coordinates(x, scaler)
        (w, b), = linear.fit_path(z, targets, link, [config.c], weights,
                                  tol=linear.FINAL_TOL)
        if x.shape[1] > len(x):
            w = _back_to_features(x, z, w, scaler)
    return LinearProbe(w.T.copy(), b, link, *(scaler or (None, None)))


def _back_to_features(x, z, wz, scaler=None, block: int = 4096) -> np.ndarray:
    """Weights [D, K] in feature space of weights ``wz`` fitted on ``z`` = U S, the row
    space coordinates of ``x`` (standardised by ``scaler``): X^T U S^-1 wz, a column
    block of ``x`` at a time (the D x N basis is never formed)."""
    a = z @ (wz / np.sum(z * z, axis=0)[:, None])  # U S^-1 wz: Z's columns have norm s
    return np.concatenate([linear.columns(x, i, block, scaler).T @ a
                           for i in range(0, x.shape[1], block)])


def probabilities(estimator: LinearProbe, x, task: Task) -> np.ndarray:
    """The probe's probabilities in the task's shape ([N] binary, else [N, K])."""
    probs = estimator.predict_proba(x)
    if probs.shape[1] == 1:
        return probs[:, 0] if task.kind == "binary" else np.column_stack([1 - probs[:, 0],
                                                                          probs[:, 0]])
    return probs


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


def _fold_paths(x, y, task: Task, folds, scaled: bool, class_weight) -> List[list]:
    """For each fold, the validation rows' probabilities under every C of `C_GRID`
    (fitted along the C path, folds side by side on the machine's cores)."""
    targets, link = linear.targets_of(task.kind, y, len(task.class_names))
    weights = linear.sample_weights(task.kind, y, class_weight)
    # Raw features: one row-space basis of all the rows serves every fold (a fold's
    # optimum lies in the span of its own rows, which it contains).
    shared = None if scaled else _coordinates(x)

    def one(fold):
        tr, va = fold
        z = shared if shared is not None else _coordinates(x, _scaler(x, tr))
        path = linear.fit_path(z[tr], targets[tr], link, C_GRID,
                               None if weights is None else weights[tr])
        return [probabilities(LinearProbe(w.T, b, link), z[va], task) for w, b in path]
    workers = max(1, min(len(folds), os.cpu_count() or 1))
    with linear.single_thread(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, folds))


def choose(features, y, task: Task, folds: Optional[Sequence] = None, seed: int = 0,
           class_weight=None, poolings: Sequence[str] = POOLINGS,
           progress: bool = False) -> Choice:
    """Scores every pooling x standardisation (but `NOT_TRIED`) x C on ``folds``
    (default: an inner stratified 5-fold split of these rows) and returns the best by
    mean score (the
    smaller C of a tie, as the C path is walked upwards); with ``progress``, a progress
    bar counts the paths (one per fold and variant)."""
    y = np.asarray(y)
    if folds is None:
        _, smallest = task_lib.smallest_class(task, y)
        folds = cv_lib.make_folds(y, max(2, min(INNER_FOLDS, smallest)), seed, task)
    best, tried = None, 0
    variants = [(how, scaled) for how in poolings for scaled in SCALINGS
                if (how, scaled) not in NOT_TRIED]
    bar = (progress_lib.bar(len(variants) * len(folds), "path", "linear probe")
           if progress else None)
    for how in poolings:
        x = pooled(features, how)
        for scaled in [sc for h, sc in variants if h == how]:
            paths = _fold_paths(x, y, task, folds, scaled, class_weight)
            if bar is not None:
                bar.add(len(folds))
            for j, c in enumerate(C_GRID):
                oof = np.zeros((len(y), *((task.units,) if task.units > 1 else ())))
                scores = []
                for (_, va), path in zip(folds, paths):
                    oof[va] = path[j]
                    scores.append(task.headline_score(y[va], oof[va]))
                tried += 1
                if best is None or np.mean(scores) > np.mean(best.fold_scores) + 1e-12:
                    best = Choice(ProbeConfig(how, scaled, c), scores, oof, 0)
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
    scores = [task.headline_score(y[va], probabilities(fit(x[tr], y[tr], task, config),
                                                       x[va], task)) for tr, va in folds]
    return {f"{name}_mean": float(np.mean(scores)), f"{name}_std": float(np.std(scores)),
            f"fold_{name}s": [round(a, 6) for a in scores], "folds": len(folds)}


def keras_head(estimator: LinearProbe, config: ProbeConfig, task: Task, input_shape,
               name: str = "probe"):
    """The fitted probe as a Keras model from the feature map: pooling (or flatten), the
    standardisation when it has one (a Normalization layer), and one Dense layer with the
    regression's weights and the task's activation. Plain layers only, so a model built
    on it loads with ``safe_mode=True``."""
    import keras
    coef, intercept = estimator.coef, estimator.intercept
    if coef.shape[0] != task.units:  # two classes as --task=multiclass: softmax([0, z])
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros_like(intercept), intercept])
    inputs = keras.Input(input_shape, name=f"{name}_features")
    pool = {"average": keras.layers.GlobalAveragePooling2D, "max":
            keras.layers.GlobalMaxPooling2D, "flatten": keras.layers.Flatten}[config.pooling]
    x = pool(name=f"{name}_pool", dtype="float32")(inputs)
    if estimator.mean is not None:
        x = keras.layers.Normalization(mean=estimator.mean, variance=estimator.scale ** 2,
                                       name=f"{name}_standardise", dtype="float32")(x)
    dense = keras.layers.Dense(coef.shape[0], activation=task.activation, dtype="float32",
                               name=f"{name}_predictions")
    outputs = dense(x)
    dense.set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    return keras.Model(inputs, outputs, name=name)
