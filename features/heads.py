"""Training dense heads (and block5) from cached features, and reporting on them.

A scenario trains from the highest cached layer below its first trainable
layer: scenario A (output layer only) from ``fc2`` when the ImageNet top is
kept, else from ``block5_pool``; B from ``block5_pool``; C (block5 + dense)
from ``block4_pool``. Because the trained sub-model shares its layers with the
full classifier, the result drops onto the conv base unchanged.
"""

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Dict, Optional, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn import metrics as sk_metrics
from sklearn.model_selection import StratifiedKFold

from features import backbone
from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.errors import ConfigError

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")


def snapshot(model: keras.Model):
    """Weights *and* random-seed state (e.g. dropout's), so that a restored model
    trains identically: ``get_weights`` alone leaves dropout masks drifting."""
    seeds = [v for v in model.variables if "seed_generator" in v.path]
    return model.get_weights(), [(v, v.numpy()) for v in seeds]


def restore(model: keras.Model, state) -> None:
    """Undoes everything since `snapshot`."""
    weights, seeds = state
    model.set_weights(weights)
    for variable, value in seeds:
        variable.assign(value)


def start_layer(blocks: Sequence[str], include_top: bool) -> str:
    """The cached layer a set of trainable blocks can train from ("input" if none)."""
    blocks = set(blocks)
    if blocks & {"block1", "block2", "block3", "block4"}:
        return "input"
    if "block5" in blocks:
        return "block4_pool"
    if "fc" in blocks or not include_top:
        return "block5_pool"
    return "fc2"


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the best epoch in memory and restores them at the end."""

    def __init__(self, monitor="val_auc", mode="max"):
        super().__init__()
        self.monitor, self.mode = monitor, mode
        self.best, self.best_epoch, self.best_weights = None, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        better = (self.best is None or (value > self.best if self.mode == "max"
                                        else value < self.best))
        if better:
            self.best, self.best_epoch = value, epoch + 1
            self.best_weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


@dataclasses.dataclass
class HeadResult:
    """Outcome of training one scenario on cached features."""
    scenario: str
    start_layer: str
    history: pd.DataFrame
    best_epoch: int
    val_auc: float          # exact (scikit-learn) AUC of the restored best weights
    val_accuracy: float
    seconds: float
    weights_path: Optional[str] = None

    def summary(self) -> dict:
        return {"best_val_auc": round(self.val_auc, 6), "val_accuracy": round(self.val_accuracy, 6),
                "epoch": self.best_epoch, "seconds": round(self.seconds, 3),
                "start_layer": self.start_layer, "weights": self.weights_path}


def _history_frame(history: keras.callbacks.History) -> pd.DataFrame:
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame[[c for c in HISTORY_COLUMNS if c in frame] +
                 [c for c in frame if c not in HISTORY_COLUMNS]]


def _shuffled_batches(x, y, batch_size: int, seed: int) -> tf.data.Dataset:
    """In-memory features, reshuffled every epoch from an explicit seed.

    Keras' own ``shuffle=True`` for arrays draws from TensorFlow's global op-seed
    counter, so two identical runs in one process shuffle differently; an
    explicitly seeded tf.data shuffle makes a scenario's result reproducible.
    """
    return (tf.data.Dataset.from_tensor_slices((x, np.asarray(y, np.float32)))
            .shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size))


def fit_from_features(model: keras.Model, x_train, y_train, x_val, y_val, *, epochs: int,
                      batch_size: int, learning_rate: float, seed: int, verbose: int = 0):
    """Compiles and fits ``model`` on in-memory features; restores the best-AUC epoch.

    Returns (history frame, best epoch, exact validation AUC, validation accuracy, seconds).
    """
    keras.utils.set_random_seed(seed)
    backbone.compile_model(model, learning_rate)
    best = BestWeights()
    started = time.perf_counter()
    history = model.fit(_shuffled_batches(x_train, y_train, batch_size, seed), epochs=epochs,
                        validation_data=(x_val, np.asarray(y_val, np.float32)),
                        validation_batch_size=batch_size, callbacks=[best], shuffle=False,
                        verbose=verbose)
    seconds = time.perf_counter() - started
    probs = model.predict(x_val, batch_size=max(batch_size, 64), verbose=0)[:, 0]
    auc, accuracy = binary_scores(y_val, probs)
    return _history_frame(history), best.best_epoch or epochs, auc, accuracy, seconds


def binary_scores(labels, probs):
    """(ROC AUC, accuracy at 0.5); AUC is NaN when only one class is present."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, np.float64)
    accuracy = float(np.mean((probs >= 0.5) == (labels == 1)))
    if len(np.unique(labels)) < 2:
        return float("nan"), accuracy
    return float(sk_metrics.roc_auc_score(labels, probs)), accuracy


def train_scenarios(classifier: backbone.Classifier, scenarios: Sequence[str],
                    train_feats: Dict[str, np.ndarray], y_train, val_feats: Dict[str, np.ndarray],
                    y_val, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
                    out_dir: Optional[str] = None, verbose: int = 1) -> Dict[str, HeadResult]:
    """Trains each scenario from the same initial weights; saves best weights and history.

    Files written into ``out_dir`` (when given): ``heads/<S>.weights.h5`` and
    ``history_heads_<S>.csv``.
    """
    initial = snapshot(classifier.model)
    results = {}
    for scenario in scenarios:
        restore(classifier.model, initial)
        blocks = backbone.scenario_blocks(scenario)
        backbone.set_trainable(classifier, blocks)
        start = start_layer(blocks, classifier.include_top)
        model = classifier.model_from(start)
        logging.info("Scenario %s: training %s from cached %s for %d epochs.", scenario,
                     "+".join(blocks), start, epochs)
        history, best_epoch, auc, accuracy, seconds = fit_from_features(
            model, train_feats[start], y_train, val_feats[start], y_val, epochs=epochs,
            batch_size=batch_size, learning_rate=learning_rate, seed=seed, verbose=verbose)
        result = HeadResult(scenario, start, history, best_epoch, auc, accuracy, seconds)
        if out_dir:
            result.weights_path = os.path.join(out_dir, "heads", f"{scenario}.weights.h5")
            with atomic_path(result.weights_path) as tmp:
                model.save_weights(tmp)
            write_csv(history, os.path.join(out_dir, f"history_heads_{scenario}.csv"))
        logging.info("Scenario %s: best val AUC %.4f (accuracy %.3f) at epoch %d, %.1f s.",
                     scenario, auc, accuracy, best_epoch, seconds)
        results[scenario] = result
    restore(classifier.model, initial)
    return results


def load_scenario_weights(classifier: backbone.Classifier, scenario: str, weights_path: str):
    """Puts a scenario's cache-trained weights into ``classifier`` (in place)."""
    start = start_layer(backbone.scenario_blocks(scenario), classifier.include_top)
    if not os.path.isfile(weights_path):
        raise ConfigError(f"No trained head for scenario {scenario} at {weights_path}; run "
                          "--stage=heads first (with the same --workdir).")
    with warnings.catch_warnings():
        # The file also holds the heads stage's optimizer state, which fine-tuning
        # does not want (it starts a fresh optimizer); Keras warns when it skips it.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        classifier.model_from(start).load_weights(weights_path)


def cross_validate(classifier: backbone.Classifier, scenarios: Sequence[str],
                   feats: Dict[str, np.ndarray], labels, *, folds: int, epochs: int,
                   batch_size: int, learning_rate: float, seed: int) -> Dict[str, dict]:
    """Stratified K-fold AUC per scenario (AUC after the last epoch; no peeking)."""
    labels = np.asarray(labels)
    if folds < 2 or np.bincount(labels.astype(int)).min() < folds:
        raise ConfigError(f"--cv_folds={folds} needs at least 2 folds and at least {folds} "
                          "images in each class.")
    initial = snapshot(classifier.model)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = {}
    for scenario in scenarios:
        blocks = backbone.scenario_blocks(scenario)
        start = start_layer(blocks, classifier.include_top)
        aucs = []
        for k, (tr, va) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            restore(classifier.model, initial)
            backbone.set_trainable(classifier, blocks)
            model = classifier.model_from(start)
            keras.utils.set_random_seed(seed + k)
            backbone.compile_model(model, learning_rate)
            model.fit(_shuffled_batches(feats[start][tr], labels[tr], batch_size, seed + k),
                      epochs=epochs, shuffle=False, verbose=0)
            probs = model.predict(feats[start][va], batch_size=64, verbose=0)[:, 0]
            aucs.append(binary_scores(labels[va], probs)[0])
        out[scenario] = {"auc_mean": float(np.mean(aucs)), "auc_std": float(np.std(aucs)),
                         "fold_aucs": [round(a, 6) for a in aucs], "folds": folds}
        logging.info("Scenario %s: %d-fold CV AUC %.4f +- %.4f", scenario, folds,
                     out[scenario]["auc_mean"], out[scenario]["auc_std"])
    restore(classifier.model, initial)
    return out


def write_csv(frame: pd.DataFrame, path: str) -> None:
    """Writes a CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_json(path: str, data) -> None:
    """Writes ``data`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def update_metrics(path: str, section: str, values) -> dict:
    """Merges ``{section: values}`` into the JSON file at ``path`` (atomically)."""
    data = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            logging.warning("Replacing unreadable %s.", path)
    data[section] = values
    write_json(path, data)
    return data


def plot_comparison(histories: Dict[str, pd.DataFrame], path: str,
                    metrics_to_plot=("val_accuracy", "val_auc"), title="") -> str:
    """One panel per metric, one line per run (e.g. scenario), against epoch; PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(metrics_to_plot), figsize=(5 * len(metrics_to_plot), 3.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics_to_plot):
        for label, frame in histories.items():
            if metric in frame:
                ax.plot(frame.epoch, frame[metric], marker="o", label=str(label))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
