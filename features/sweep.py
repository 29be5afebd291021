"""Systematic search from the feature cache: a grid scored by stratified K-fold CV.

Changing one setting at a time and reading a jumpy validation curve on 200
images is how the reference write-up tuned its model. Here every grid point
(scenario x learning rate x optimizer x dropout x cached augmented views) is
trained on the same K folds of the training split from cached features, and
ranked by its mean CV AUC at its best epoch, with the standard deviation over
folds beside it, so that differences smaller than the noise are visible as such.
"""

import itertools
import logging
import time
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
import pandas as pd

from features import backbone, heads
from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError

COLUMNS = ("rank", "scenario", "optimizer", "learning_rate", "dropout", "views", "epoch",
           "cv_auc_mean", "cv_auc_std", "fold_aucs", "seconds")


def parse_floats(text: Sequence[str], flag: str) -> List[float]:
    """Parses a list flag of numbers such as ``1e-3,1e-4``."""
    try:
        return [float(v) for v in text]
    except ValueError:
        raise ConfigError(f"{flag} must be a comma-separated list of numbers; got "
                          f"{','.join(text)!r}.") from None


def build_grid(scenarios: Sequence[str], learning_rates: Sequence[float],
               optimizers: Sequence[str], dropouts: Sequence[float], views: Sequence[int],
               head_has_dropout: bool = True) -> List[heads.HeadConfig]:
    """Every combination, validated; dropout collapses to ``None`` for a head without one."""
    for name in optimizers:
        backbone.make_optimizer(name, 1e-3)  # raises a clear error for unknown names
    scenarios = [backbone.get_scenario(s).name for s in scenarios]
    if any(v < 0 for v in views):
        raise ConfigError(f"Sweep views must be >= 0; got {list(views)}.")
    if any(lr <= 0 for lr in learning_rates):
        raise ConfigError(f"Sweep learning rates must be > 0; got {list(learning_rates)}.")
    drops = sorted(set(dropouts)) if head_has_dropout else [None]
    grid = []
    for s, lr, opt, d, v in itertools.product(scenarios, learning_rates, optimizers, drops,
                                              sorted(set(views))):
        config = heads.HeadConfig(s, float(lr), opt.strip().lower(), d, int(v))
        if config not in grid:
            grid.append(config)
    if not grid:
        raise ConfigError("The sweep grid is empty: every --sweep_* list needs a value.")
    return grid


def run(classifier: backbone.Classifier, grid: Sequence[heads.HeadConfig],
        feats: Dict[str, np.ndarray], labels, folds, *, epochs: int, batch_size: int,
        seed: int, views_feats: Optional[Dict[str, np.ndarray]] = None,
        progress: bool = True) -> pd.DataFrame:
    """Cross-validates every grid point on ``folds``; returns the ranked table.

    Args:
      feats: plain cached features of the training split, by layer.
      views_feats: the training split's cached augmented views, view-major with
        at least ``max(config.views)`` views; a config with ``views=k`` uses the
        first k.
    """
    labels = np.asarray(labels)
    n = len(labels)
    available = 0 if not views_feats else len(next(iter(views_feats.values()))) // n
    needed = max(c.views for c in grid)
    if needed > available:
        raise ConfigError(f"The sweep asks for {needed} augmented views per image but "
                          f"{available} are cached.")
    bar = keras.utils.Progbar(len(grid) * len(folds), unit_name="fold") if progress else None
    rows = []
    for config in grid:
        start = backbone.start_layer(backbone.scenario_blocks(config.scenario),
                                     classifier.include_top)
        views_x = views_feats[start][:config.views * n] if config.views else None
        started = time.perf_counter()
        curves = heads.cv_curves(classifier, config, feats[start], labels, folds,
                                 epochs=epochs, batch_size=batch_size, seed=seed,
                                 views_x=views_x, progress=bar)
        cv = heads.summarise_curves(curves)
        rows.append({"scenario": config.scenario, "optimizer": config.optimizer,
                     "learning_rate": config.learning_rate, "dropout": config.dropout,
                     "views": config.views, "epoch": cv["epoch"],
                     "cv_auc_mean": round(cv["auc_mean"], 6), "cv_auc_std": round(cv["auc_std"], 6),
                     "fold_aucs": " ".join(f"{a:.4f}" for a in cv["fold_aucs"]),
                     "seconds": round(time.perf_counter() - started, 2)})
        logging.info("Sweep %s: CV AUC %.4f +- %.4f (epoch %d).", config.describe(),
                     cv["auc_mean"], cv["auc_std"], cv["epoch"])
    return rank(pd.DataFrame(rows))


def rank(table: pd.DataFrame) -> pd.DataFrame:
    """Sorts by mean CV AUC (ties: smaller std first) and numbers the rows from 1."""
    table = table.sort_values(["cv_auc_mean", "cv_auc_std"], ascending=[False, True],
                              na_position="last", kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table[list(COLUMNS)]


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
    missing = [c for c in COLUMNS if c not in table]
    if missing or table.empty:
        raise ConfigError(f"{path} is not a sweep table (missing {', '.join(missing) or 'rows'});"
                          " run --stage=sweep again.")
    return rank(table.drop(columns=["rank"]))


def format_top(table: pd.DataFrame, n: int = 5) -> str:
    """The first ``n`` rows as aligned text for the console."""
    cols = ["rank", "scenario", "optimizer", "learning_rate", "dropout", "views", "epoch",
            "cv_auc_mean", "cv_auc_std", "seconds"]
    return table.head(n)[cols].to_string(index=False)


def write(table: pd.DataFrame, csv_path: str, png_path: str,
          probe_cv: Optional[float] = None) -> None:
    """Writes the ranked table (CSV) and a CV-AUC-with-error-bars chart (PNG), atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    labels = [heads.HeadConfig(r.scenario, r.learning_rate, r.optimizer,
                               None if pd.isna(r.dropout) else r.dropout, int(r.views)).describe()
              for r in table.itertuples()]
    height = max(3.0, 0.28 * len(table) + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    y = np.arange(len(table))[::-1]
    ax.errorbar(table.cv_auc_mean, y, xerr=table.cv_auc_std, fmt="o", capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    if probe_cv is not None and np.isfinite(probe_cv):
        ax.axvline(probe_cv, color="grey", linestyle="--", label=f"linear probe {probe_cv:.4f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("CV ROC AUC (mean +- std over folds)")
    ax.set_title("Sweep on cached features (best first)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
