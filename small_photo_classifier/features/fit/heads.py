"""Training dense heads (and block5) from cached features: the heads stage.

A scenario trains from the highest cached layer below its first trainable
layer: scenario A (output layer only) from ``fc2`` when the ImageNet top is
kept, else from ``block5_pool``; B from ``block5_pool``; C (block5 + dense)
from ``block4_pool``. Because the trained sub-model shares its layers with the
full classifier, the result drops onto the conv base unchanged.

With cross-validation folds, each scenario is first cross-validated (`features.choose.cv`)
and its epoch chosen by the mean fold score; the final head then trains on the
whole training split for that epoch, through the same compiled trainer.
"""

import dataclasses
import logging
import os
import shutil
import time
import warnings
from typing import Dict, Optional, Sequence

import keras
import numpy as np
import pandas as pd

from small_photo_classifier.features import backbone, scenarios
from small_photo_classifier.features.choose import cv as cv_lib
from small_photo_classifier.features.store import rows as rows_lib
from small_photo_classifier.features.fit.settings import FitSettings
from small_photo_classifier.features.task import Task
from small_photo_classifier.features.fit.loop import EpochLog, HeadTrainer, restore, snapshot
from small_photo_classifier.pipeline.atomic import atomic_path
from small_photo_classifier.pipeline import progress as progress_lib
from small_photo_classifier.pipeline.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What one cached-feature training run varies: the sweep's grid point.

    ``dropout`` None keeps the classifier's own rate; ``views`` is the number of
    cached augmented views per training image added to the plain ones.
    """
    scenario: str
    learning_rate: float
    optimizer: str = "adam"
    dropout: Optional[float] = None
    views: int = 0

    @classmethod
    def for_scenario(cls, scenario: str, learning_rate: Optional[float] = None,
                     pooling: str = "flatten", **kwargs) -> "HeadConfig":
        """A config with the scenario table's learning rate for a head that ``pooling``s
        the feature map (`features.scenarios.Scenario.rate`) unless one is given."""
        row = scenarios.get_scenario(scenario)
        return cls(row.name, row.rate(pooling) if learning_rate is None else learning_rate,
                   **kwargs)

    @property
    def row(self) -> scenarios.Scenario:
        return scenarios.get_scenario(self.scenario)

    def trainer(self, classifier: backbone.Classifier, task: Task, **kwargs) -> HeadTrainer:
        """The compiled trainer of this configuration's scenario."""
        return HeadTrainer(classifier, self.row.blocks, task, learning_rate=self.learning_rate,
                           optimizer=self.optimizer, dropout=self.dropout, **kwargs)

    def describe(self) -> str:
        """Short label for plots and logs, e.g. ``B adam lr=1e-4 do=0.5 v=2``."""
        text = f"{self.scenario} {self.optimizer} lr={self.learning_rate:g}"
        if self.dropout is not None:
            text += f" do={self.dropout:g}"
        return text + f" v={self.views}"


@dataclasses.dataclass
class HeadResult:
    """Outcome of training one scenario on cached features."""
    scenario: str
    start_layer: str
    history: pd.DataFrame   # per epoch: the final fit's columns, and cv_<metric> with CV
    best_epoch: int
    val_scores: dict        # exact scores of the kept weights on the validation split
    seconds: float
    task: Task
    weights_path: Optional[str] = None
    config: Optional[HeadConfig] = None
    cv: Optional[cv_lib.CVResult] = None  # cross-validation on the training split, when run
    val_probs: Optional[np.ndarray] = None  # probabilities of the kept weights on validation
    weights: Optional[list] = None  # the kept weights of the scenario's part, when fitted
    epoch_limit: Optional[int] = None  # the most epochs allowed (--epochs)
    # Without CV: the validation probabilities of every epoch, from which an estimate
    # of the epoch chosen on some validation images is made on the others
    # (`features.choose.honest`).
    epoch_probs: Optional[list] = None

    @property
    def at_limit(self) -> bool:
        """The chosen epoch is the last allowed: the score was still improving there."""
        if self.cv is not None:
            return self.cv.at_limit
        return self.epoch_limit is not None and self.best_epoch >= self.epoch_limit

    @property
    def fitted(self) -> bool:
        """Whether the scenario was fitted on the whole training split (with CV, only the
        scenario CV ranks first is: see `train_scenarios`)."""
        return self.val_probs is not None

    @property
    def selected_by(self) -> str:
        return "cross-validation" if self.cv else "validation"

    @property
    def val_score(self) -> float:
        """The task's headline metric on the validation split."""
        return float(self.val_scores.get(self.task.headline, np.nan))

    @property
    def score(self) -> float:
        """What scenarios are ranked by: the CV mean when cross-validated, else validation."""
        return self.cv.mean if self.cv else self.val_score

    def summary(self) -> dict:
        """The ``metrics.json`` entry of this scenario."""
        headline = self.task.headline
        out = {"epoch": self.best_epoch, "seconds": round(self.seconds, 3),
               "start_layer": self.start_layer, "weights": self.weights_path,
               "epoch_selected_by": self.selected_by, "fitted": self.fitted,
               "epochs_allowed": self.epoch_limit, "still_improving_at_limit": self.at_limit}
        if self.fitted:
            out[f"best_val_{headline}"] = round(self.val_score, 6)
        out.update({f"val_{k}": round(v, 6) for k, v in self.val_scores.items()
                    if k != headline})
        if self.config is not None:
            out.update({"learning_rate": self.config.learning_rate,
                        "optimizer": self.config.optimizer, "dropout": self.config.dropout,
                        "views": self.config.views})
        if self.cv:
            out.update({f"cv_{headline}_mean": round(self.cv.mean, 6),
                        f"cv_{headline}_std": round(self.cv.std, 6)})
        return out


@dataclasses.dataclass
class FeatureSplit:
    """One split's cached features by layer (arrays or `rows.H5Rows`) and labels; for the
    training split also its cached augmented views by layer (K per image, view-major:
    the first N rows are every image's first view)
    and its cross-validation folds (index pairs into its rows)."""
    feats: Dict[str, object]
    y: np.ndarray
    views: Optional[Dict[str, object]] = None
    folds: Optional[Sequence] = None


def train_scenarios(classifier: backbone.Classifier, configs: Sequence, task: Task,
                    train: FeatureSplit, val: FeatureSplit, fit: FitSettings, *,
                    out_dir: Optional[str] = None,
                    tensorboard_dir: Optional[str] = None) -> Dict[str, HeadResult]:
    """Trains each config's scenario from the same initial weights; saves the weights.

    Without ``train.folds`` every scenario is fitted on the training split and keeps its
    epoch with the best validation score: the validation set ranks them. With folds each
    scenario is first cross-validated; the one with the best mean CV score (at its best
    epoch), which a small validation set cannot sway, is then fitted on the whole
    training split to that epoch. The others cannot be chosen any more, so they are not
    fitted (`fit_head` fits one later from its CV epoch, e.g. to fine-tune it).

    ``configs`` may also be scenario names: they train with the scenario table's
    learning rate. Written into ``out_dir`` (when given): ``heads/<S>.weights.h5`` of
    each fitted scenario; with ``tensorboard_dir``, TensorBoard logs of each final fit
    in ``<tensorboard_dir>/heads_<S>``.
    """
    configs = [HeadConfig.for_scenario(c, pooling=classifier.net.pooling)
               if isinstance(c, str) else c for c in configs]
    initial = snapshot(classifier.model)
    cvs, seconds = {}, {}
    for config in configs if train.folds else ():
        restore(classifier.model, initial)
        started = time.perf_counter()
        cvs[config.scenario] = cross_validate_scenario(classifier, config, task, train, fit)
        seconds[config.scenario] = time.perf_counter() - started
    best = max(cvs, key=lambda s: cvs[s].mean if np.isfinite(cvs[s].mean) else -np.inf,
               default=None)
    results = {}
    for config in configs:
        s, cv = config.scenario, cvs.get(config.scenario)
        if cv is not None and s != best:
            logging.info("Scenario %s: not fitted on the whole training split (cross-"
                         "validation ranks scenario %s first).", s, best)
            results[s] = HeadResult(s, classifier.start_layer(config.row.blocks),
                                    cv_frame(cv), cv.epoch, {}, seconds[s], task,
                                    config=config, cv=cv, epoch_limit=fit.epochs)
            continue
        restore(classifier.model, initial)
        result = fit_head(classifier, config, task, train, val, fit,
                          epoch=cv.epoch if cv is not None else None,
                          tensorboard_dir=tensorboard_dir)
        if cv is not None:
            result.cv, result.seconds = cv, result.seconds + seconds[s]
            result.history = result.history.merge(cv_frame(cv), on="epoch", how="outer")
        if out_dir:
            result.weights_path = save_head_weights(classifier, s, out_dir)
        results[s] = result
    restore(classifier.model, initial)
    return results


def cv_frame(cv: cv_lib.CVResult) -> pd.DataFrame:
    """A scenario's cross-validation as a history table: ``cv_<metric>`` (the mean over
    folds) and ``cv_<metric>_std`` per epoch."""
    with warnings.catch_warnings():  # an epoch no fold could score is NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(cv.curves, axis=0), np.nanstd(cv.curves, axis=0)
    return pd.DataFrame({"epoch": np.arange(1, cv.curves.shape[1] + 1),
                         f"cv_{cv.metric}": mean, f"cv_{cv.metric}_std": std})


def cross_validate_scenario(classifier, config: HeadConfig, task: Task, train: FeatureSplit,
                            fit: FitSettings) -> cv_lib.CVResult:
    """One scenario's cross-validation on ``train.folds`` (the classifier is left as it
    was found)."""
    scenario = config.scenario
    start = classifier.start_layer(config.row.blocks)
    folds = train.folds

    print(f"Scenario {scenario}: {len(folds)}-fold cross-validation" + (
        f", until the mean score has not improved for {fit.patience} epochs (at most "
        f"{fit.epochs})" if fit.patience else f", {fit.epochs} epochs"))

    def bar(first, last):
        return progress_lib.bar(len(folds), "fold", f"epochs {first}-{last}", lines=1)
    with config.trainer(classifier, task, label_smoothing=fit.label_smoothing) as trainer:
        cv = cv_lib.cross_validate(trainer, train.feats[start], np.asarray(train.y), folds, fit,
                                   views_x=train.views[start] if train.views else None,
                                   progress=bar if fit.progress else None)
    logging.info("Scenario %s: %s at epoch %d of %d trained (chosen by CV).%s", scenario,
                 cv_lib.format_cv(cv), cv.epoch, cv.curves.shape[1],
                 f" {still_improving(cv.limit)}" if cv.at_limit else "")
    return cv


def still_improving(limit: int, flag: str = "--epochs") -> str:
    """The words for a chosen epoch that is the last one allowed."""
    return (f"still improving at the last epoch ({limit}): raise {flag}")


def fold_members(classifier, config: HeadConfig, task: Task, train: FeatureSplit,
                 fit: FitSettings, epoch: int) -> list:
    """The trainable weights of each cross-validation fold of ``config`` at ``epoch``
    (the bag's members), trained again as its cross-validation trained them
    (`features.choose.cv.fold_weights`)."""
    start = classifier.start_layer(config.row.blocks)
    with config.trainer(classifier, task, label_smoothing=fit.label_smoothing) as trainer:
        return cv_lib.fold_weights(trainer, train.feats[start], np.asarray(train.y),
                                   train.folds, fit, epoch,
                                   views_x=train.views[start] if train.views else None)


def fit_head(classifier, config: HeadConfig, task: Task, train: FeatureSplit,
             val: FeatureSplit, fit: FitSettings, *, epoch: Optional[int] = None,
             tensorboard_dir=None) -> HeadResult:
    """Fits one scenario on the whole training split (with its cached views) from the
    classifier's current weights and leaves the kept weights in it: after ``epoch``
    epochs (e.g. chosen by cross-validation), else those of the best validation epoch
    (training stops ``fit.patience`` epochs after it, at most ``fit.epochs``)."""
    scenario = config.scenario
    start = classifier.start_layer(config.row.blocks)
    keep = epoch or "best"
    limit = fit.epochs
    if epoch:
        fit = fit.replace(epochs=epoch)  # chosen already: no more epochs than that
    started = time.perf_counter()
    with config.trainer(classifier, task, label_smoothing=fit.label_smoothing) as trainer:
        logging.info("Scenario %s: training %s from cached %s for %s (%s).",
                     scenario, "+".join(config.row.blocks_on(classifier.net)), start,
                     f"{epoch} epochs (chosen by cross-validation)" if epoch else
                     f"at most {fit.epochs} epochs" + (f", until the validation score has "
                                                       f"not improved for {fit.patience}"
                                                       if fit.patience else ""),
                     config.describe())
        x_tr, y_tr = rows_lib.with_views(train.feats[start], np.asarray(train.y),
                                         train.views[start] if train.views else None)
        callbacks = [EpochLog(f"Scenario {scenario}", fit.epochs, quiet=True)]
        if tensorboard_dir:
            log_dir = os.path.join(tensorboard_dir, f"heads_{scenario}")
            shutil.rmtree(log_dir, ignore_errors=True)  # one run's curves per folder
            callbacks.append(keras.callbacks.TensorBoard(log_dir))
        fitted = trainer.fit(x_tr, y_tr, fit, val=(val.feats[start], val.y), keep=keep,
                             callbacks=callbacks, record=() if epoch else ("probs",))
        probs = trainer.predict(val.feats[start])
    result = HeadResult(scenario, start, fitted.history, fitted.kept_epoch,
                        task.scores(val.y, probs), time.perf_counter() - started, task,
                        config=config, val_probs=probs,
                        weights=config.row.part(classifier).get_weights(),
                        epoch_limit=limit, epoch_probs=None if epoch else fitted.val_probs)
    logging.info("Scenario %s: validation %s at epoch %d, %.1f s.%s", scenario,
                 ", ".join(f"{k} {v:.4f}" for k, v in result.val_scores.items()),
                 result.best_epoch, result.seconds,
                 f" {still_improving(limit)}" if result.at_limit and not epoch else "")
    return result


def best_result(results: Dict[str, HeadResult]) -> HeadResult:
    """The result with the highest score (CV mean when cross-validated); NaN ranks last."""
    return max(results.values(), key=lambda r: r.score if np.isfinite(r.score) else -np.inf)


def weights_file(out_dir: str, scenario: str) -> str:
    return os.path.join(out_dir, "heads", f"{scenario}.weights.h5")


def save_head_weights(classifier: backbone.Classifier, scenario: str, out_dir: str) -> str:
    """Saves the scenario's part (``heads/<S>.weights.h5``) atomically; returns the path."""
    path = weights_file(out_dir, scenario)
    part = scenarios.get_scenario(scenario).part(classifier)
    with atomic_path(path) as tmp, backbone.without_training_state(part):
        part.save_weights(tmp)
    return path


def load_scenario_weights(classifier: backbone.Classifier, scenario: str, weights_path: str,
                          in_memory: Optional[list] = None):
    """Puts a scenario's cache-trained weights into ``classifier`` (in place): ``in_memory``
    (its part's weights, as `HeadResult.weights` kept them) when given, else the file."""
    if in_memory is not None:
        scenarios.get_scenario(scenario).part(classifier).set_weights(in_memory)
        return
    if not os.path.isfile(weights_path):
        raise ConfigError(f"No trained head for scenario {scenario} at {weights_path}; run "
                          "--stage=heads first (with the same --workdir).")
    with warnings.catch_warnings():
        # Keras warns when the file's optimizer state and a compiled part's differ: files
        # from older versions hold the heads stage's optimizer, new ones none. Fine-tuning
        # starts a fresh optimizer either way.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        scenarios.get_scenario(scenario).part(classifier).load_weights(weights_path)
