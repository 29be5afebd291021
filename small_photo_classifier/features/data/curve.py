"""The learning curve: how the cross-validated score grows with the number of labels.

For each fraction of the training labels (10% .. 100%), every cross-validation
fold's training part is cut to that fraction (stratified, several random subsets)
and the model is scored on the fold's whole validation part, so every point is
measured on the same held-out images. A saturating power law,
``score(n) = top - scale * n ** -rate``, fitted to the points, says what more
labels should add; a bootstrap over the subsets gives the range, and the curve is
extended (to 2x and 4x the labels) only when the fit is stable enough to mean
something.
"""

import dataclasses
from typing import Callable, List, Optional, Sequence

import numpy as np
import pandas as pd

from small_photo_classifier.features.choose import cv as cv_lib
from small_photo_classifier.features.task import Task

FRACTIONS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
# The fit must leave the extrapolated gain's range narrower than this (in score units)
# to be reported as a number: wider, and the data do not support extrapolation.
MAX_RANGE = 0.1
# ... and the law must explain at least this share of the points' variance (R^2):
# below it the points are noise around a flat line, whatever the fit's parameters.
MIN_R2 = 0.5
# ... and the scores must rise with the labels: Spearman's rank correlation of every
# measured run's score with its label count, one-sided at this level.
MAX_TREND_P = 0.05


def subset(y, fraction: float, seed: int, task: Optional[Task] = None) -> np.ndarray:
    """Indices of a stratified random ``fraction`` of rows (at least one per class; for
    multi-label rows, iterative stratification, as the splits use, so that every label
    keeps its share and the subset keeps its size however many distinct label sets)."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    if fraction >= 1:
        return np.arange(len(y))
    if task is not None and task.kind == "multilabel":
        from small_photo_classifier.pipeline import split
        take = max(1, int(round(fraction * len(y))))
        part = split.iterative_assign(y.astype(int), [len(y) - take, take], seed)
        return np.sort(np.flatnonzero(part == 1))
    key = cv_lib.stratify_key(task, y) if task is not None else y.astype(int)
    picked = []
    for value in np.unique(key):
        rows = np.flatnonzero(key == value)
        take = max(1, int(round(fraction * len(rows))))
        picked.append(rng.permutation(rows)[:take])
    return np.sort(np.concatenate(picked))


def fits(folds: Sequence, fractions: Sequence[float] = FRACTIONS, repeats: int = 3) -> int:
    """How many models `measure` trains (for a progress bar)."""
    return len(folds) * sum(repeats if f < 1 else 1 for f in fractions)


def measure(score: Callable[[np.ndarray, np.ndarray], float], y, folds: Sequence, task: Task,
            fractions: Sequence[float] = FRACTIONS, repeats: int = 3,
            seed: int = 0, progress=None) -> pd.DataFrame:
    """One row per (fraction, repeat, fold): ``score(train_rows, val_rows)`` of a model
    trained on a stratified ``fraction`` of the fold's training rows, scored on all of its
    validation rows. ``labels`` is how many labelled images that model saw. ``progress``
    (a `pipeline.progress.bar`) counts the models."""
    rows = []
    for fraction in fractions:
        for r in range(repeats if fraction < 1 else 1):
            for k, (tr, va) in enumerate(folds):
                part = tr[subset(np.asarray(y)[tr], fraction, seed + 1000 * r + k, task)]
                rows.append({"fraction": fraction, "repeat": r, "fold": k,
                             "labels": len(part), "score": float(score(part, va))})
                if progress is not None:
                    progress.add(1)
    return pd.DataFrame(rows)


def _law(n, top, scale, rate):
    return top - scale * np.power(n, -rate)


def _fit(labels: np.ndarray, scores: np.ndarray, ceiling: float = 1.0):
    """(top, scale, rate) of the law; ``top`` never above ``ceiling`` (a score of 1 is
    perfect: a law heading past it would promise gains no model can make)."""
    from scipy.optimize import curve_fit
    guess = (min(ceiling, scores.max() + 0.01), (scores.max() - scores.min() + 1e-3) *
             labels.min() ** 0.5, 0.5)
    params, _ = curve_fit(_law, labels, scores, p0=guess, maxfev=20000,
                          bounds=([0, 0, 0.05], [ceiling + 1e-9, np.inf, 3.0]))
    return params


@dataclasses.dataclass
class Forecast:
    """What the fitted curve says about more labels."""
    labels: int                 # labels the full training split gives one fold model
    now: float                  # mean score at 100%
    params: Optional[tuple]     # (top, scale, rate) of the fitted law, None when it failed
    gain_2x: Optional[float]    # expected score gain from twice the labels
    range_2x: Optional[tuple]
    score_4x: Optional[float]
    range_4x: Optional[tuple]
    supported: bool             # whether the data support extrapolating at all

    def sentence(self, metric: str, who: str, total: Optional[int] = None) -> str:
        """``total``: the training images the folds are cut from (said beside the fold
        size, which is what every point of the curve counts)."""
        of = (f"{self.labels} labels, a cross-validation fold's training part of the "
              f"{total} training images" if total else f"{self.labels} labels")
        if not self.supported or self.gain_2x is None:
            return (f"{who}: the learning curve is too noisy to say what more labels would "
                    f"add (no extrapolation; {metric} {self.now:.4f} with {of}).")
        return (f"{who}: doubling the labels ({of}; {self.labels} -> {2 * self.labels}) is "
                f"expected to add about {self.gain_2x:+.3f} {metric} (range "
                f"{self.range_2x[0]:+.3f} .. {self.range_2x[1]:+.3f}); from {self.now:.4f} "
                "now.")


def forecast(table: pd.DataFrame, boots: int = 200, seed: int = 0,
             ceiling: float = 1.0) -> Forecast:
    """Fits the law to the mean score per fraction, and bootstraps the measured runs
    (every fold of every subset, resampled within each fraction) to put a range on the
    score at 2x and 4x the labels (never above ``ceiling``)."""
    points = table.groupby("fraction").agg(labels=("labels", "mean"),
                                           score=("score", "mean")).reset_index()
    full = points[points.fraction == points.fraction.max()]
    n, now = int(round(full.labels.mean())), float(full.score.mean())
    try:
        params = _fit(points.labels.to_numpy(float), points.score.to_numpy(float), ceiling)
    except (RuntimeError, ValueError):
        return Forecast(n, now, None, None, None, None, None, False)
    rng = np.random.default_rng(seed)
    groups = [(g.labels.to_numpy(float), g.score.to_numpy(float))
              for _, g in table.groupby("fraction")]
    at2, at4 = [], []
    for _ in range(boots):
        drawn = [rng.integers(0, len(s), len(s)) for _, s in groups]
        labels = np.array([l[d].mean() for (l, _), d in zip(groups, drawn)])
        scores = np.array([s[d].mean() for (_, s), d in zip(groups, drawn)])
        try:
            p = _fit(labels, scores, ceiling)
        except (RuntimeError, ValueError):
            continue
        base = _law(n, *p)
        at2.append(min(ceiling, _law(2 * n, *p)) - base)
        at4.append(min(ceiling, _law(4 * n, *p)))
    if len(at2) < boots // 2:
        return Forecast(n, now, tuple(params), None, None, None, None, False)
    scores = points.score.to_numpy(float)
    residual = scores - _law(points.labels.to_numpy(float), *params)
    r2_fit = 1 - residual.var() / max(scores.var(), 1e-12)
    gain2 = min(ceiling, _law(2 * n, *params)) - _law(n, *params)
    r2 = tuple(float(v) for v in np.quantile(at2, [0.05, 0.95]))
    r4 = tuple(float(v) for v in np.quantile(at4, [0.05, 0.95]))
    # The runs' scores must rise with the labels beyond chance (rank correlation over
    # every fold of every subset), or the law is a curve drawn through noise.
    # Constant scores (or label counts) have no rank correlation: no trend, and no
    # warning from scipy about it.
    trend = False
    if np.ptp(table.score.to_numpy(float)) > 0 and np.ptp(table.labels.to_numpy(float)) > 0:
        from scipy.stats import spearmanr
        rising = spearmanr(table.labels, table.score)
        trend = bool(rising.statistic > 0 and rising.pvalue < MAX_TREND_P)
    supported = (r2[1] - r2[0]) <= MAX_RANGE and r2_fit >= MIN_R2 and trend
    return Forecast(n, now, tuple(float(v) for v in params), float(gain2), r2,
                    float(min(ceiling, _law(4 * n, *params))), r4, supported)


def summary_table(table: pd.DataFrame, model: str) -> pd.DataFrame:
    """Mean and standard deviation of the score per fraction (over folds and repeats);
    ``labels`` is the typical (median, whole) number of labels a model of that fraction
    saw: folds differ by an image or so."""
    out = (table.groupby("fraction").agg(labels=("labels", "median"), mean=("score", "mean"),
                                         std=("score", "std"), runs=("score", "size"))
           .reset_index().assign(model=model, kind="measured"))
    return out.assign(labels=out["labels"].round().astype(int))


def extension_rows(result: Forecast, model: str) -> List[dict]:
    """The extrapolated points (2x, 4x) as table rows, when the fit supports them."""
    if not result.supported or result.params is None:
        return []
    out = []
    for factor, low_high in ((2, None), (4, result.range_4x)):
        value = min(1.0, _law(factor * result.labels, *result.params))
        if factor == 2:  # the measured score plus the fitted gain, as the sentence says
            value = result.now + result.gain_2x
            low_high = tuple(result.now + g for g in result.range_2x)
        out.append({"model": model, "kind": "extrapolated", "fraction": float(factor),
                    "labels": factor * result.labels, "mean": value,
                    "low": low_high[0], "high": low_high[1]})
    return out
