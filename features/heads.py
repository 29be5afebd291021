"""Training dense heads (and block5) from cached features, and reporting on them.

A scenario trains from the highest cached layer below its first trainable
layer: scenario A (output layer only) from ``fc2`` when the ImageNet top is
kept, else from ``block5_pool``; B from ``block5_pool``; C (block5 + dense)
from ``block4_pool``. Because the trained sub-model shares its layers with the
full classifier, the result drops onto the conv base unchanged.
"""

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn import metrics as sk_metrics
from sklearn.model_selection import StratifiedKFold

from features import backbone, precision
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


class WeightsAtEpoch(keras.callbacks.Callback):
    """Restores the weights of one given epoch at the end of training.

    Keras' EarlyStopping(restore_best_weights=True) restores the epoch with the
    best *monitored* value of this run; here the epoch was chosen beforehand by
    cross-validation, which a small validation set cannot overrule.
    """

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch, self.weights = epoch, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            self.weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


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
                     **kwargs) -> "HeadConfig":
        """A config with the scenario table's learning rate unless one is given."""
        row = backbone.get_scenario(scenario)
        return cls(row.name, row.learning_rate if learning_rate is None else learning_rate,
                   **kwargs)

    def describe(self) -> str:
        """Short label for plots and logs, e.g. ``B adam lr=1e-4 do=0.5 v=2``."""
        text = f"{self.scenario} {self.optimizer} lr={self.learning_rate:g}"
        if self.dropout is not None:
            text += f" do={self.dropout:g}"
        return text + f" v={self.views}"


@contextlib.contextmanager
def dropout_rate(classifier: backbone.Classifier, rate: Optional[float]):
    """Temporarily sets the head's dropout rate (no-op for ``None`` or a head without one).

    Keras reads ``Dropout.rate`` when it traces the training step, and every fit
    here compiles afresh, so the new rate applies to that fit only.
    """
    layer = _dropout_layer(classifier)
    if rate is None or layer is None:
        yield
        return
    if not 0 <= rate < 1:
        raise ConfigError(f"Dropout rate must be in [0, 1); got {rate}.")
    old = layer.rate
    layer.rate = float(rate)
    try:
        yield
    finally:
        layer.rate = old


def _dropout_layer(classifier: backbone.Classifier) -> Optional[keras.layers.Dropout]:
    return next((layer for layer in classifier.head.layers
                 if isinstance(layer, keras.layers.Dropout)), None)


def has_dropout(classifier: backbone.Classifier) -> bool:
    """Whether the head has a dropout layer (only without the ImageNet top)."""
    return _dropout_layer(classifier) is not None


@dataclasses.dataclass
class HeadResult:
    """Outcome of training one scenario on cached features."""
    scenario: str
    start_layer: str
    history: pd.DataFrame
    best_epoch: int
    val_auc: float          # exact (scikit-learn) AUC of the kept weights
    val_accuracy: float
    seconds: float
    weights_path: Optional[str] = None
    config: Optional[HeadConfig] = None
    cv: Optional[dict] = None  # cross-validation on the training split, when run
    selected_by: str = "validation"
    val_probs: Optional[np.ndarray] = None  # P(positive) of the kept weights on validation

    @property
    def score(self) -> float:
        """What scenarios are ranked by: CV mean AUC when cross-validated, else val AUC."""
        return self.cv["auc_mean"] if self.cv else self.val_auc

    def summary(self) -> dict:
        out = {"best_val_auc": round(self.val_auc, 6), "val_accuracy": round(self.val_accuracy, 6),
               "epoch": self.best_epoch, "seconds": round(self.seconds, 3),
               "start_layer": self.start_layer, "weights": self.weights_path,
               "epoch_selected_by": self.selected_by}
        if self.config is not None:
            out.update({"learning_rate": self.config.learning_rate,
                        "optimizer": self.config.optimizer, "dropout": self.config.dropout,
                        "views": self.config.views})
        if self.cv:
            out.update({"cv_auc_mean": round(self.cv["auc_mean"], 6),
                        "cv_auc_std": round(self.cv["auc_std"], 6)})
        return out


def _history_frame(history: keras.callbacks.History) -> pd.DataFrame:
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame[[c for c in HISTORY_COLUMNS if c in frame] +
                 [c for c in frame if c not in HISTORY_COLUMNS]]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch`` (0-based): ``default_rng([seed, epoch]).permutation(n)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def shuffled_batches(x, y, batch_size: int, seed: int, epochs: int,
                     per_epoch: Optional[int] = None):
    """``epochs`` epochs of feature batches, each epoch in its `epoch_order`; returns
    (dataset, steps per epoch). Fit it with ``steps_per_epoch=steps``.

    ``per_epoch`` rows (default: all) are taken from the front of each epoch's order,
    e.g. one image's worth of a pool of K augmented views per image.

    The order is a table fixed before training, so two identical runs in one process
    train identically (Keras' ``shuffle=True`` draws from TensorFlow's global op-seed
    counter) and so does a MirroredStrategy run: under it, a seeded tf.data shuffle
    and a PyDataset both came out in another order from the second epoch on, because
    the strategy resets and prefetches input differently. Rows are gathered from
    ``x`` (anything NumPy-indexable) on the host, a batch at a time.
    """
    y = np.asarray(y, np.float32)
    n = len(y)
    per_epoch = n if per_epoch is None else min(per_epoch, n)
    steps = -(-per_epoch // batch_size)
    orders = np.stack([epoch_order(n, seed, e)[:per_epoch]
                       for e in range(epochs)]).astype(np.int64)
    shape = tuple(np.shape(x)[1:])

    def gather(rows):
        return np.asarray(x[rows], np.float32), y[rows]

    def load(rows):
        xb, yb = tf.numpy_function(gather, [rows], [tf.float32, tf.float32], stateful=False)
        xb.set_shape([None, *shape])
        yb.set_shape([None])
        return xb, yb

    dataset = (tf.data.Dataset.from_tensor_slices(orders)
               .flat_map(lambda order: tf.data.Dataset.from_tensor_slices(order)
                         .batch(batch_size))
               .map(load).prefetch(2))
    return dataset, steps


def take(x, rows):
    """Rows of ``x``: an array's copy, or (for `cache.H5Rows`) a view that reads nothing."""
    return x[rows] if isinstance(x, np.ndarray) else x.take(rows)


def with_views(x, y, views_x=None, rows=None):
    """Training rows ``rows`` of the plain features plus the same images' cached views.

    ``views_x`` holds V views per image, view-major (row ``v * N + i`` is view v of
    image i of the N plain rows), as `cache.load_features` returns them. Streamed
    features (`cache.H5Rows`) stay streamed.
    """
    n = len(y)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    y = np.asarray(y)
    if views_x is None or len(views_x) == 0:
        return take(x, rows), y[rows]
    v = len(views_x) // n
    view_rows = np.concatenate([rows + k * n for k in range(v)])
    labels = np.concatenate([y[rows]] * (v + 1))
    if isinstance(x, np.ndarray) and isinstance(views_x, np.ndarray):
        return np.concatenate([x[rows], views_x[view_rows]]), labels
    return type(x).concat([take(x, rows), take(views_x, view_rows)]), labels


def sequential_batches(x, y, batch_size: int) -> tf.data.Dataset:
    """Batches of ``x`` (array or `cache.H5Rows`) and ``y`` in order, read a batch at a
    time: validation and prediction without holding ``x`` in memory."""
    y = np.asarray(y, np.float32)
    shape = tuple(np.shape(x)[1:]) if isinstance(x, np.ndarray) else tuple(x.shape[1:])

    def gather(start):
        stop = min(int(start) + batch_size, len(y))
        return np.asarray(x[int(start):stop], np.float32), y[int(start):stop]

    def load(start):
        xb, yb = tf.numpy_function(gather, [start], [tf.float32, tf.float32], stateful=False)
        xb.set_shape([None, *shape])
        yb.set_shape([None])
        return xb, yb

    return tf.data.Dataset.range(0, len(y), batch_size).map(load).prefetch(2)


def predict_rows(model: keras.Model, x, batch_size: int) -> np.ndarray:
    """P(positive) of every row of ``x`` (array or `cache.H5Rows`), batch by batch."""
    if isinstance(x, np.ndarray):
        return model.predict(x, batch_size=batch_size, verbose=0)[:, 0]
    # One predict over a streamed dataset (predict_on_batch per chunk returned every row
    # once per replica under MirroredStrategy).
    return model.predict(sequential_batches(x, np.zeros(len(x)), batch_size).map(
        lambda xb, yb: xb), verbose=0)[:, 0]


def fit_head(classifier: backbone.Classifier, config: HeadConfig, x_train, y_train,
             x_val=None, y_val=None, *, epochs: int, batch_size: int, seed: int,
             keep_epoch: Optional[int] = None, callbacks=(), verbose: int = 0):
    """Compiles and fits the part of ``classifier`` that ``config.scenario`` trains.

    The caller puts the classifier in its starting state (see `snapshot`). With
    ``keep_epoch`` the weights after that epoch are kept; otherwise, given
    validation data, those of the epoch with the best validation AUC. Returns
    (the fitted sub-model, its keras History).
    """
    blocks = backbone.scenario_blocks(config.scenario)
    backbone.set_trainable(classifier, blocks, log=False)
    model = classifier.model_from(backbone.start_layer(blocks, classifier.include_top))
    keras.utils.set_random_seed(seed)
    callbacks = list(callbacks)
    if keep_epoch is not None:
        callbacks.append(WeightsAtEpoch(keep_epoch))
    elif x_val is not None:
        # patience=epochs: never stops early, only restores the best epoch at the end.
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=epochs, restore_best_weights=True))
    validation = (sequential_batches(x_val, y_val, batch_size) if x_val is not None
                  else None)
    with dropout_rate(classifier, config.dropout):
        backbone.compile_model(model, config.learning_rate, config.optimizer)
        batches, steps = shuffled_batches(x_train, y_train, batch_size, seed, epochs)
        history = model.fit(batches, steps_per_epoch=steps,
                            epochs=epochs, validation_data=validation, callbacks=callbacks,
                            shuffle=False, verbose=verbose)
    return model, history


def binary_scores(labels, probs):
    """(ROC AUC, accuracy at 0.5); AUC is NaN when only one class is present."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, np.float64)
    accuracy = float(np.mean((probs >= 0.5) == (labels == 1)))
    if len(np.unique(labels)) < 2:
        return float("nan"), accuracy
    return float(sk_metrics.roc_auc_score(labels, probs)), accuracy


def make_folds(labels, folds: int, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold (train, validation) index pairs, shuffled by ``seed``."""
    labels = np.asarray(labels).astype(int)
    smallest = int(np.bincount(labels, minlength=2).min())
    if folds < 2 or smallest < folds:
        raise ConfigError(f"--cv_folds={folds} needs at least 2 folds and at least {folds} "
                          f"training images in each class (the smaller class has {smallest}).")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


class FoldTrainer:
    """Trains one config's scenario fold after fold with a single compiled training step.

    Keras' ``fit`` traces (and under XLA compiles) a new step after every
    ``compile``, and cross-validation fits the same shapes K times: here the step
    is built once per config, XLA-compiled (about 4x faster per epoch on CPU),
    and the weights and optimizer slots are reset by assignment between folds.
    The step is the one ``fit`` runs: the same model call, loss, optimizer and
    seeded shuffle; without XLA it reproduces ``fit`` exactly (tested). Under XLA
    rounding differs slightly and dropout masks come from XLA's own RNG algorithm,
    so results match ``fit`` in distribution rather than bit for bit.
    """

    def __init__(self, classifier: backbone.Classifier, config: HeadConfig,
                 jit_compile: bool = True):
        blocks = backbone.scenario_blocks(config.scenario)
        backbone.set_trainable(classifier, blocks, log=False)
        self.model = classifier.model_from(backbone.start_layer(blocks, classifier.include_top))
        self.optimizer = precision.loss_scaled(
            backbone.make_optimizer(config.optimizer, config.learning_rate))
        self.optimizer.build(self.model.trainable_variables)
        self._fresh = [v.numpy() for v in self.optimizer.variables]
        self._loss = keras.losses.BinaryCrossentropy()
        features = tf.TensorSpec([None, *self.model.input.shape[1:]], tf.float32)
        signature = [features, tf.TensorSpec([None], tf.float32)]
        self._strategy = tf.distribute.get_strategy()
        if self._strategy.num_replicas_in_sync > 1:
            # Mirrored variables are updated from the replicas (each on its share of the
            # batch), not compiled by XLA as one step: tf.distribute owns that graph.
            self._step = tf.function(self._distributed_step, input_signature=signature)
            jit_compile = False
        else:
            self._step = tf.function(self._train_step, jit_compile=jit_compile,
                                     input_signature=signature)
        self._predict = tf.function(lambda x: self.model(x, training=False)[:, 0],
                                    jit_compile=jit_compile, input_signature=[features])

    def _distributed_step(self, x, y):
        """`_train_step` split over the replicas; the summed gradients equal the global
        batch's (each replica's loss is its share of the global mean)."""
        total = tf.cast(tf.shape(y)[0], tf.float32)

        def shard(t):
            def piece(ctx):
                per = (tf.shape(t)[0] + ctx.num_replicas_in_sync - 1) // ctx.num_replicas_in_sync
                return t[ctx.replica_id_in_sync_group * per:
                         (ctx.replica_id_in_sync_group + 1) * per]
            return self._strategy.experimental_distribute_values_from_function(piece)

        def replica_step(xs, ys):
            with tf.GradientTape() as tape:
                per_image = keras.losses.binary_crossentropy(
                    ys[:, None], self.model(xs, training=True))
                loss = tf.reduce_sum(per_image) / total
                scaled = self.optimizer.scale_loss(loss)
            variables = self.model.trainable_variables
            self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
            return loss

        losses = self._strategy.run(replica_step, args=(shard(x), shard(y)))
        return self._strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    def _train_step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self._loss(y[:, None], self.model(x, training=True))
            # Identity except under mixed_float16, where apply_gradients unscales.
            scaled = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return loss

    def predict(self, x, batch_size: int = 64) -> np.ndarray:
        """P(positive) for features ``x``."""
        return np.concatenate([self._predict(np.asarray(x[i:i + batch_size], np.float32)).numpy()
                               for i in range(0, len(x), batch_size)])

    def train(self, x, y, *, epochs: int, batch_size: int, seed: int, x_val=None,
              y_val=None) -> List[float]:
        """Trains from the model's current weights with fresh optimizer state; returns the
        exact validation AUC after each epoch (empty without validation data)."""
        for variable, value in zip(self.optimizer.variables, self._fresh):
            variable.assign(value)
        keras.utils.set_random_seed(seed)
        y = np.asarray(y, np.float32)  # x stays as given: an array or streamed rows
        aucs = []
        for epoch in range(epochs):
            order = epoch_order(len(y), seed, epoch)  # as `shuffled_batches`, so as fit
            for start in range(0, len(y), batch_size):
                rows = order[start:start + batch_size]
                self._step(np.asarray(x[rows], np.float32), y[rows])
            if x_val is not None:
                aucs.append(binary_scores(y_val, self.predict(x_val))[0])
        return aucs


def cv_curves(classifier: backbone.Classifier, config: HeadConfig, x, y, folds, *,
              epochs: int, batch_size: int, seed: int, views_x=None,
              progress: Optional[keras.utils.Progbar] = None,
              jit_compile: bool = True) -> np.ndarray:
    """Exact validation AUC after every epoch on every fold: an array [folds, epochs].

    Each fold starts from the classifier's current weights and is restored after;
    fold k shuffles with seed ``seed + k``.
    """
    initial = snapshot(classifier.model)
    y = np.asarray(y)
    curves = []
    try:
        with dropout_rate(classifier, config.dropout):
            trainer = FoldTrainer(classifier, config, jit_compile)
            for k, (tr, va) in enumerate(folds):
                restore(classifier.model, initial)
                x_tr, y_tr = with_views(x, y, views_x, tr)
                curves.append(trainer.train(x_tr, y_tr, epochs=epochs, batch_size=batch_size,
                                            seed=seed + k, x_val=take(x, va), y_val=y[va]))
                if progress is not None:
                    progress.add(1)
    finally:
        restore(classifier.model, initial)
    return np.asarray(curves, np.float64)


def summarise_curves(curves: np.ndarray) -> dict:
    """The epoch whose mean AUC over folds is highest, with that epoch's mean and std."""
    mean = np.nanmean(curves, axis=0)
    best = int(np.nanargmax(mean)) if np.isfinite(mean).any() else len(mean) - 1
    at = curves[:, best]
    return {"epoch": best + 1, "auc_mean": float(np.nanmean(at)), "auc_std": float(np.nanstd(at)),
            "fold_aucs": [round(float(a), 6) for a in at], "folds": int(curves.shape[0]),
            "mean_auc_per_epoch": [round(float(m), 6) for m in mean]}


def train_scenarios(classifier: backbone.Classifier, configs: Sequence[HeadConfig],
                    train_feats: Dict[str, np.ndarray], y_train, val_feats: Dict[str, np.ndarray],
                    y_val, *, epochs: int, batch_size: int, seed: int,
                    learning_rate: Optional[float] = None, folds: Optional[Sequence] = None,
                    views_feats: Optional[Dict[str, np.ndarray]] = None,
                    out_dir: Optional[str] = None, tensorboard_dir: Optional[str] = None,
                    progress: bool = True, verbose: int = 1) -> Dict[str, HeadResult]:
    """Trains each config's scenario from the same initial weights; saves weights and history.

    Without ``folds`` the kept epoch is the one with the best validation AUC. With
    ``folds`` (index pairs into the training rows) each scenario is first
    cross-validated on them; the epoch with the best mean CV AUC is kept and the
    scenario is ranked by that mean, which a small validation set cannot sway.

    ``configs`` may also be scenario names: they train with ``learning_rate``, or
    the scenario table's rate when it is None. Files written into ``out_dir``
    (when given): ``heads/<S>.weights.h5`` and ``history_heads_<S>.csv``; with
    ``tensorboard_dir``, TensorBoard logs of each scenario's training in
    ``<tensorboard_dir>/heads_<S>``.
    """
    initial = snapshot(classifier.model)
    results = {}
    y_train = np.asarray(y_train)
    for config in configs:
        if isinstance(config, str):
            config = HeadConfig.for_scenario(config, learning_rate)
        scenario = config.scenario
        restore(classifier.model, initial)
        start = backbone.start_layer(backbone.scenario_blocks(scenario), classifier.include_top)
        views_x = views_feats[start] if views_feats else None
        started = time.perf_counter()
        cv, keep = None, None
        if folds:
            if progress:
                print(f"Scenario {scenario}: {len(folds)}-fold cross-validation")
            bar = keras.utils.Progbar(len(folds), unit_name="fold") if progress else None
            curves = cv_curves(classifier, config, train_feats[start], y_train, folds,
                               epochs=epochs, batch_size=batch_size, seed=seed, views_x=views_x,
                               progress=bar)
            cv = summarise_curves(curves)
            keep = cv["epoch"]
            logging.info("Scenario %s: %d-fold CV AUC %.4f +- %.4f at epoch %d (chosen by CV).",
                         scenario, len(folds), cv["auc_mean"], cv["auc_std"], keep)
        logging.info("Scenario %s: training %s from cached %s for %d epochs (%s).", scenario,
                     "+".join(backbone.scenario_blocks(scenario)), start, epochs,
                     config.describe())
        x_tr, y_tr = with_views(train_feats[start], y_train, views_x)
        board = []
        if tensorboard_dir:
            log_dir = os.path.join(tensorboard_dir, f"heads_{scenario}")
            shutil.rmtree(log_dir, ignore_errors=True)  # one run's curves per folder
            board.append(keras.callbacks.TensorBoard(log_dir))
        model, history = fit_head(classifier, config, x_tr, y_tr, val_feats[start], y_val,
                                  epochs=epochs, batch_size=batch_size, seed=seed,
                                  keep_epoch=keep, callbacks=board, verbose=verbose)
        frame = _history_frame(history)
        if keep is None:
            keep = int(frame.epoch[frame.val_auc.idxmax()]) if len(frame) else epochs
        seconds = time.perf_counter() - started
        probs = predict_rows(model, val_feats[start], max(batch_size, 64))
        auc, accuracy = binary_scores(y_val, probs)
        result = HeadResult(scenario, start, frame, keep, auc, accuracy, seconds,
                            config=config, cv=cv,
                            selected_by="cross-validation" if cv else "validation",
                            val_probs=probs)
        if out_dir:
            result.weights_path = os.path.join(out_dir, "heads", f"{scenario}.weights.h5")
            with atomic_path(result.weights_path) as tmp:
                model.save_weights(tmp)
            # From Keras' History, written once and atomically: CSVLogger writes while
            # training (a kill leaves a torn file) and numbers epochs from 0.
            write_csv(frame, os.path.join(out_dir, f"history_heads_{scenario}.csv"))
        logging.info("Scenario %s: val AUC %.4f (accuracy %.3f) at epoch %d, %.1f s.",
                     scenario, auc, accuracy, keep, seconds)
        results[scenario] = result
    restore(classifier.model, initial)
    return results


def best_result(results: Dict[str, HeadResult]) -> HeadResult:
    """The result with the highest score (CV mean when cross-validated); NaN ranks last."""
    return max(results.values(),
               key=lambda r: r.score if np.isfinite(r.score) else -np.inf)


def fold_members(classifier: backbone.Classifier, config: HeadConfig, x, y, folds, *,
                 epochs: int, batch_size: int, seed: int, views_x=None) -> List[list]:
    """The K fold models of a bag: weights of the scenario's trainable part, one per fold.

    Each member is trained on its fold's training rows for ``epochs`` epochs exactly
    as `cv_curves` trains it (same step, same seeds), so it is the model that
    produced that fold's score at that epoch.
    """
    initial = snapshot(classifier.model)
    y = np.asarray(y)
    members = []
    try:
        with dropout_rate(classifier, config.dropout):
            trainer = FoldTrainer(classifier, config)
            for k, (tr, _) in enumerate(folds):
                restore(classifier.model, initial)
                x_tr, y_tr = with_views(x, y, views_x, tr)
                trainer.train(x_tr, y_tr, epochs=epochs, batch_size=batch_size, seed=seed + k)
                members.append(trainer.model.get_weights())
    finally:
        restore(classifier.model, initial)
    return members


def load_scenario_weights(classifier: backbone.Classifier, scenario: str, weights_path: str):
    """Puts a scenario's cache-trained weights into ``classifier`` (in place)."""
    start = backbone.start_layer(backbone.scenario_blocks(scenario), classifier.include_top)
    if not os.path.isfile(weights_path):
        raise ConfigError(f"No trained head for scenario {scenario} at {weights_path}; run "
                          "--stage=heads first (with the same --workdir).")
    with warnings.catch_warnings():
        # The file also holds the heads stage's optimizer state, which fine-tuning
        # does not want (it starts a fresh optimizer); Keras warns when it skips it.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        classifier.model_from(start).load_weights(weights_path)


def set_dropout(classifier: backbone.Classifier, rate: Optional[float]) -> None:
    """Sets the head's dropout rate for good (no-op for ``None`` or no dropout layer)."""
    layer = _dropout_layer(classifier)
    if rate is not None and layer is not None:
        layer.rate = float(rate)


def _bag_file(folder: str, scenario: str) -> str:
    return os.path.join(folder, f"{scenario}.npz")


def save_bag_members(classifier: backbone.Classifier, scenario: str, members, folder: str):
    """Saves the fold heads' weights (``<folder>/<S>.npz``) atomically."""
    arrays = {f"m{k}_w{i}": w for k, weights in enumerate(members)
              for i, w in enumerate(weights)}
    os.makedirs(folder, exist_ok=True)
    with atomic_path(_bag_file(folder, scenario)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, members=len(members), **arrays)


def load_bag_members(classifier: backbone.Classifier, scenario: str, folder: str) -> List[list]:
    """The fold heads saved by `save_bag_members` ([] when there are none)."""
    path = _bag_file(folder, scenario)
    if not os.path.isfile(path):
        return []
    part = classifier.model_from(backbone.start_layer(backbone.scenario_blocks(scenario),
                                                      classifier.include_top))
    n_weights = len(part.get_weights())
    try:
        with np.load(path) as data:
            return [[data[f"m{k}_w{i}"] for i in range(n_weights)]
                    for k in range(int(data["members"]))]
    except (OSError, KeyError, ValueError) as err:
        raise ConfigError(f"Cannot read the bag's fold heads {path} ({err}); rerun "
                          "--stage=heads.") from err


def read_metrics(path: str) -> dict:
    """The run's metrics.json as a dict ({} when absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def chosen_scenario(metrics_path: str) -> str:
    """The scenario the heads stage chose (recorded in ``metrics.json``)."""
    data = read_metrics(metrics_path)
    if "heads_choice" in data:
        scenario = data["heads_choice"]["scenario"]
        logging.info("Scenario chosen by the heads stage (by %s): %s.",
                     data["heads_choice"]["by"], scenario)
        return scenario
    if not data.get("heads"):
        raise ConfigError(f"No heads-stage results in {metrics_path}: run --stage=heads first "
                          "or pass --scenario.")
    scores = {s: m.get("best_val_auc") for s, m in data["heads"].items()}
    best = max(scores, key=lambda s: scores[s] if scores[s] is not None
               and np.isfinite(scores[s]) else -np.inf)
    logging.info("Best scenario by validation AUC: %s (%.4f).", best, scores[best])
    return best


def format_summary(results: Dict[str, HeadResult], probe: dict, best: HeadResult) -> str:
    """The heads stage's console summary: each scenario, the probe, and who wins."""
    lines = []
    for s, r in results.items():
        cv = (f", {r.cv['folds']}-fold CV AUC {r.cv['auc_mean']:.4f} +- {r.cv['auc_std']:.4f}"
              if r.cv else "")
        lines.append(f"scenario {s}: val AUC {r.val_auc:.4f}, accuracy {r.val_accuracy:.3f} "
                     f"(epoch {r.best_epoch} by {r.selected_by}{cv}; {r.seconds:.1f} s, from "
                     f"{r.start_layer})")
    cv = (f", CV AUC {probe['cv_auc_mean']:.4f} +- {probe['cv_auc_std']:.4f}"
          if "cv_auc_mean" in probe else "")
    lines.append(f"linear probe (baseline): val AUC {probe['val_auc']:.4f}, accuracy "
                 f"{probe['val_accuracy']:.3f}{cv}")
    probe_score = probe.get("cv_auc_mean", probe["val_auc"]) if best.cv else probe["val_auc"]
    what = "CV AUC" if best.cv else "val AUC"
    verdict = "beats" if best.score > probe_score else "does NOT beat"
    lines.append(f"best scenario {best.scenario} {verdict} the probe: {what} {best.score:.4f} "
                 f"vs {probe_score:.4f}")
    return "\n".join(lines)


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


def plot_history(history: pd.DataFrame, path: str, title: str = "Fine-tuning") -> str:
    """Train vs validation accuracy, loss and AUC per epoch (a fine-tuning history); PNG."""
    names = ("accuracy", "loss", "auc")
    return plot_comparison(
        {"train": history[["epoch", *names]],
         "validation": history[["epoch", *(f"val_{m}" for m in names)]]
         .rename(columns=lambda c: c.replace("val_", ""))},
        path, metrics_to_plot=names, title=title)


def plot_comparison(histories: Dict[str, pd.DataFrame], path: str,
                    metrics_to_plot=("val_accuracy", "val_auc"), title="",
                    reference: Optional[dict] = None) -> str:
    """One panel per metric, one line per run (e.g. scenario), against epoch; PNG.

    ``reference`` maps a metric to (value, label): a dashed horizontal line, e.g.
    the linear probe's validation AUC.
    """
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
        if reference and metric in reference and np.isfinite(reference[metric][0]):
            value, label = reference[metric]
            ax.axhline(value, color="grey", linestyle="--", label=f"{label} {value:.4f}")
            low, high = ax.get_ylim()  # axhline does not widen the axis by itself
            ax.set_ylim(min(low, value - 0.01), max(high, value + 0.01))
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
