"""Systematic search from the feature cache: a grid scored by stratified K-fold CV.

Changing one setting at a time and reading a jumpy validation curve on 200
images is how the reference write-up tuned its model. Here every grid point
(scenario x learning rate x optimizer x dropout x cached augmented views) is
trained on the same K folds of the training split from cached features, and
ranked by its mean CV score (the task's headline metric: ROC AUC for a binary
task) at its best epoch, with the standard deviation over folds beside it, so
that differences smaller than the noise are visible as such. Each configuration
compiles one trainer for all its folds (`features.fit.loop.HeadTrainer`).
"""

import itertools
import logging
import time
from typing import List, Sequence

import numpy as np
import pandas as pd

from small_photo_classifier.features import backbone, scenarios
from small_photo_classifier.features.choose import cv as cv_lib
from small_photo_classifier.features.fit import heads
from small_photo_classifier.features.fit.settings import FitSettings
from small_photo_classifier.features.task import Task
from small_photo_classifier.pipeline.errors import ConfigError
from small_photo_classifier.pipeline import progress as progress_lib

SETTINGS = ("scenario", "optimizer", "learning_rate", "dropout", "views", "epoch")


def columns(metric: str = "auc") -> tuple:
    """The table's columns for a headline metric (``cv_auc_mean`` etc. for binary)."""
    return ("rank", *SETTINGS, f"cv_{metric}_mean", f"cv_{metric}_std", f"fold_{metric}s",
            "seconds")


def build_grid(names: Sequence[str], learning_rates: Sequence[float],
               optimizers: Sequence[str], dropouts: Sequence[float], views: Sequence[int],
               head_has_dropout: bool = True) -> List[heads.HeadConfig]:
    """Every combination, validated; dropout collapses to ``None`` for a head without one."""
    for name in optimizers:
        scenarios.check_optimizer(name)
    names = [scenarios.get_scenario(s).name for s in names]
    if any(v < 0 for v in views):
        raise ConfigError(f"Sweep views must be >= 0; got {list(views)}.")
    if any(lr <= 0 for lr in learning_rates):
        raise ConfigError(f"Sweep learning rates must be > 0; got {list(learning_rates)}.")
    drops = sorted(set(dropouts)) if head_has_dropout else [None]
    grid = []
    for s, lr, opt, d, v in itertools.product(names, learning_rates, optimizers, drops,
                                              sorted(set(views))):
        config = heads.HeadConfig(s, float(lr), opt.strip().lower(), d, int(v))
        if config not in grid:
            grid.append(config)
    if not grid:
        raise ConfigError("The sweep grid is empty: every --sweep_* list needs a value.")
    return grid


def run(classifier: backbone.Classifier, grid: Sequence[heads.HeadConfig], task: Task,
        train: heads.FeatureSplit, fit: FitSettings) -> pd.DataFrame:
    """Cross-validates every grid point on ``train.folds``; returns the ranked table.

    ``train.views`` holds the training split's cached augmented views, view-major with
    at least ``max(config.views)`` views; a config with ``views=k`` uses the first k.
    Each grid point trains as the heads stage would (``fit``: epochs, batch size, seed,
    class weights, label smoothing).
    """
    labels, folds, views_feats = np.asarray(train.y), train.folds, train.views
    n = len(labels)
    available = 0 if not views_feats else len(next(iter(views_feats.values()))) // n
    needed = max(c.views for c in grid)
    if needed > available:
        raise ConfigError(f"The sweep asks for {needed} augmented views per image but "
                          f"{available} are cached.")
    # One step per configuration: with patience, how many epochs each trains is decided
    # as it goes.
    bar = progress_lib.bar(len(grid), "configuration", "sweep") if fit.progress else None
    metric, rows = task.headline, []
    for config in grid:
        start = classifier.start_layer(config.row.blocks)
        views_x = views_feats[start][:config.views * n] if config.views else None
        started = time.perf_counter()
        with config.trainer(classifier, task, label_smoothing=fit.label_smoothing) as trainer:
            cv = cv_lib.cross_validate(trainer, train.feats[start], labels, folds, fit,
                                       views_x=views_x)
        if bar is not None:
            bar.add(1)
        at = cv.curves[:, cv.epoch - 1]
        rows.append({"scenario": config.scenario, "optimizer": config.optimizer,
                     "learning_rate": config.learning_rate, "dropout": config.dropout,
                     "views": config.views, "epoch": cv.epoch,
                     f"cv_{metric}_mean": round(cv.mean, 6), f"cv_{metric}_std": round(cv.std, 6),
                     f"fold_{metric}s": " ".join(f"{a:.4f}" for a in at),
                     "seconds": round(time.perf_counter() - started, 2)})
        logging.info("Sweep %s: %s (epoch %d of %d trained).", config.describe(),
                     cv_lib.format_cv(cv), cv.epoch, cv.curves.shape[1])
    return rank(pd.DataFrame(rows), metric)


def rank(table: pd.DataFrame, metric: str = "auc") -> pd.DataFrame:
    """Sorts by mean CV score (ties: smaller std first) and numbers the rows from 1."""
    table = table.sort_values([f"cv_{metric}_mean", f"cv_{metric}_std"], ascending=[False, True],
                              na_position="last", kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table[list(columns(metric))]


def metric_of(table: pd.DataFrame) -> str:
    """The headline metric a sweep table was ranked by."""
    found = [c[3:-5] for c in table.columns if c.startswith("cv_") and c.endswith("_mean")]
    if len(found) != 1:
        raise ConfigError("A sweep table has exactly one cv_<metric>_mean column.")
    return found[0]


def best_config(table: pd.DataFrame) -> heads.HeadConfig:
    """The top row of a ranked sweep table as a `HeadConfig`."""
    row = table.iloc[0]
    dropout = None if pd.isna(row["dropout"]) else float(row["dropout"])
    return heads.HeadConfig(str(row["scenario"]), float(row["learning_rate"]),
                            str(row["optimizer"]), dropout, int(row["views"]))


def read_table(path: str) -> pd.DataFrame:
    """Reads ``sweep.csv``, checking it has the sweep's columns."""
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ConfigError(f"Cannot read the sweep results {path} ({err}); run --stage=sweep "
                          "first (same --workdir).") from None
    try:
        metric = metric_of(table)
    except ConfigError:
        metric = "auc"
    missing = [c for c in columns(metric) if c not in table]
    if missing or table.empty:
        raise ConfigError(f"{path} is not a sweep table (missing {', '.join(missing) or 'rows'});"
                          " run --stage=sweep again.")
    return rank(table.drop(columns=["rank"]), metric)


def format_top(table: pd.DataFrame, n: int = 5) -> str:
    """The first ``n`` rows as aligned text for the console."""
    metric = metric_of(table)
    cols = ["rank", *SETTINGS, f"cv_{metric}_mean", f"cv_{metric}_std", "seconds"]
    return table.head(n)[cols].to_string(index=False)
