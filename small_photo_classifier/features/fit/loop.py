"""The one training loop for heads on cached features: Keras ``fit``, compiled once.

Cross-validation folds, bag members, the final heads and the sweep all train
through `HeadTrainer`. It compiles its sub-model once per configuration (Keras
then reuses the traced training step for every later ``fit``) and resets the
weights, the dropout seed state and the optimizer's variables by assignment
between folds, so K folds cost one trace instead of K.

The step is not XLA-compiled as a whole: XLA draws other dropout masks, and in
mixed bfloat16 on CPU its convolutions skip oneDNN's bfloat16 kernels (scenario
C's step ran 3.2x slower, 64 vs 20 ms per image on an AVX512-BF16 CPU); the
dense-only steps of A and B were no faster with it either (docs/benchmarks.md).
Where `precision.compile_convs` says so (a CPU in float32), the conv blocks that
train alone run XLA-compiled (`Classifier.training_model`): C's step 2x faster,
the same dropout masks.

Validation is exact: `ExactValidation` predicts the validation rows after every
epoch and puts the task's exact metrics (scikit-learn ROC AUC, accuracy, log
loss) into Keras' logs as ``val_*``, where History, TensorBoard, early stopping
and checkpoints read them. Keras' own running AUC is approximate (200
thresholds) and its validation splits batches over replicas in a way that can
leave a replica empty; this one predicts through `distribute.sharded`, which pads.
"""

import dataclasses
import logging
from typing import Callable, List, Optional, Sequence

import keras
import numpy as np
import pandas as pd

from small_photo_classifier.features import backbone, distribute, precision
from small_photo_classifier.features.store import rows as rows_lib
from small_photo_classifier.features.fit.settings import FitSettings
from small_photo_classifier.features.task import Task

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc")


def snapshot(model: keras.Model):
    """Weights *and* random-seed state (e.g. dropout's), so that a restored model
    trains identically: ``get_weights`` alone leaves dropout masks drifting."""
    return model.get_weights(), [(v, v.numpy()) for v in _seed_variables(model)]


def restore(model: keras.Model, state) -> None:
    """Undoes everything since `snapshot`."""
    weights, seeds = state
    model.set_weights(weights)
    for variable, value in seeds:
        variable.assign(value)


def history_frame(records: List[dict]) -> pd.DataFrame:
    """Per-epoch logs as a table with the standard columns first."""
    frame = pd.DataFrame(records)
    if frame.empty:
        return pd.DataFrame(columns=list(HISTORY_COLUMNS))
    return frame[[c for c in HISTORY_COLUMNS if c in frame] +
                 [c for c in frame if c not in HISTORY_COLUMNS]]


class ExactValidation(keras.callbacks.Callback):
    """After every epoch: exact validation metrics into the logs (``val_<metric>``).

    Args:
      predict: returns the validation probabilities of the model as it is now.
      y: validation labels.
      task: scores them.
      keep_probs: also keep each epoch's probabilities (``self.probs``), e.g. a
        cross-validation fold's out-of-fold predictions.
    """

    def __init__(self, predict: Callable[[], np.ndarray], y, task: Task,
                 keep_probs: bool = False):
        super().__init__()
        self.predict, self.y, self.task, self.keep_probs = predict, np.asarray(y), task, keep_probs
        self.probs, self.scores = [], []

    def on_epoch_end(self, epoch, logs=None):
        probs = self.predict()
        scores = self.task.scores(self.y, probs)
        self.scores.append(scores)
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in scores.items()})
        if self.keep_probs:
            self.probs.append(probs)


class _EpochWeights(keras.callbacks.Callback):
    """Keeps the values of ``variables`` after every epoch (e.g. a cross-validation
    fold's trainable weights, from which bag members are taken without training
    them again)."""

    def __init__(self, variables):
        super().__init__()
        self.variables, self.values = variables, []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append([v.numpy() for v in self.variables])


class EpochLog(keras.callbacks.Callback):
    """One plain log line per epoch (instead of Keras' progress bar): readable when the
    output is piped, and it shows the exact validation metrics, the epoch's time and the
    most time left (the remaining epochs at this pace; early stopping may end sooner).
    ``quiet``: in the log file only (a head's up to 100 epochs of milliseconds each)."""

    def __init__(self, what: str, epochs: int, quiet: bool = False):
        super().__init__()
        self.what, self.epochs = what, epochs
        self.log = logging.getLogger("detail").info if quiet else logging.info
        self._started = None

    def on_epoch_begin(self, epoch, logs=None):
        import time
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        import time
        logs = logs or {}
        shown = [k for k in ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc",
                             "val_map") if k in logs]
        seconds = time.perf_counter() - self._started if self._started else 0.0
        left = (self.epochs - epoch - 1) * seconds
        pace = (f" ({seconds:.0f} s; at most {left / 60:.1f} min left)"
                if seconds >= 5 and left > 0 else "")
        self.log("%s epoch %d/%d: %s%s", self.what, epoch + 1, self.epochs,
                 ", ".join(f"{k} {float(logs[k]):.4f}" for k in shown), pace)


@dataclasses.dataclass
class Fit:
    """What one ``HeadTrainer.fit`` produced."""
    history: pd.DataFrame                 # epoch, loss, ..., val_* per epoch (1-based)
    val_scores: List[dict]                # exact validation scores per epoch
    val_probs: List[np.ndarray]           # per epoch, when kept
    weights: List[list]                   # trainable weights per epoch, when kept
    kept_epoch: Optional[int] = None      # whose weights the model holds now


class HeadTrainer:
    """Trains the part of a classifier above its cached layer, one compile per config.

    Args:
      classifier: the shared classifier; its layers are trained in place.
      blocks: the blocks that train (a scenario's, or ``--trainable_blocks``).
      task: output, loss and scores.
      learning_rate, optimizer: see `features.backbone.make_optimizer`.
      dropout: the head's dropout rate while this trainer is open (None: keep).
      label_smoothing: for the loss.

    Use it as a context manager: the dropout rate is put back on exit.
    """

    def __init__(self, classifier: backbone.Classifier, blocks, task: Task, *,
                 learning_rate: float, optimizer: str = "adam", dropout: Optional[float] = None,
                 label_smoothing: float = 0.0, start: Optional[str] = None):
        self.classifier, self.task = classifier, task
        self.blocks = list(blocks)
        classifier.set_trainable(self.blocks, log=False)
        self.start = start or classifier.start_layer(self.blocks)
        self.model = classifier.training_model(self.start, precision.compile_convs())
        self._old_dropout = classifier.dropout.rate if classifier.dropout is not None else None
        classifier.set_dropout(dropout)  # read when the step is traced: before compile
        self.replicas = distribute.replicas()
        self.model.compile(optimizer=backbone.make_optimizer(optimizer, learning_rate),
                           loss=task.loss(label_smoothing), metrics=task.keras_metrics(),
                           jit_compile=False)  # see the module docstring
        self.model.optimizer.build(self.model.trainable_variables)
        self._fresh_optimizer = [v.numpy() for v in self.model.optimizer.variables]
        self._predict = distribute.sharded(lambda x: self.model(x, training=False),
                                           self.model.input.shape[1:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Puts the classifier's dropout rate back."""
        self.classifier.set_dropout(self._old_dropout)

    @property
    def trainable(self) -> list:
        return list(self.model.trainable_variables)

    def reset_optimizer(self) -> None:
        """Fresh optimizer state (moments, iteration count), as after compile."""
        for variable, value in zip(self.model.optimizer.variables, self._fresh_optimizer):
            variable.assign(value)

    def set_trainable_weights(self, values) -> None:
        for variable, value in zip(self.trainable, values):
            variable.assign(value)

    def predict(self, x, batch_size: int = 64) -> np.ndarray:
        """Probabilities ([N] binary, else [N, K]) for features ``x`` (array or H5Rows)."""
        if len(x) == 0:
            return self.task.probabilities(np.zeros((0, self.classifier.units)))
        outputs = [np.asarray(self._predict(np.asarray(x[i:i + batch_size], np.float32)))
                   for i in range(0, len(x), batch_size)]
        return self.task.probabilities(np.concatenate(outputs))

    def state(self) -> list:
        """What continuing a fit needs: the trainable weights, the optimizer's variables
        (moments, iteration count) and the dropout seeds' state, as NumPy arrays."""
        return [v.numpy() for v in (*self.trainable, *self.model.optimizer.variables,
                                    *_seed_variables(self.model))]

    def set_state(self, values) -> None:
        """Puts back what `state` returned: the next ``fit(..., first_epoch=e)`` continues
        exactly where that fit stopped."""
        for variable, value in zip((*self.trainable, *self.model.optimizer.variables,
                                    *_seed_variables(self.model)), values):
            variable.assign(value)

    def fit(self, x, y, settings: FitSettings, *, val=None, keep: Optional[object] = "best",
            record: Sequence[str] = (), callbacks=(), first_epoch: int = 0) -> Fit:
        """Trains from the model's current weights with a fresh optimizer, or (with
        ``first_epoch`` > 0) continues a fit whose `state` was put back.

        Args:
          x, y: training features and labels (`rows.with_views` adds cached views).
          settings: epochs, batch size, seed and class weights of this fit; with
            ``settings.patience`` and ``val``, the fit stops once the validation score
            has not improved for that many epochs.
          val: (x_val, y_val), validation rows scored exactly after every epoch.
          keep: whose weights to leave in the model: "best" (the best validation
            epoch by the task's headline metric; the last without validation), an
            epoch number (e.g. chosen by cross-validation), or None (the last).
          record: what to keep of every epoch in the result: "probs" (validation
            probabilities) and/or "weights" (trainable weights).
          callbacks: more Keras callbacks (e.g. an `EpochLog` for per-epoch lines).
          first_epoch: epochs already trained (0-based index of the first one to train);
            the batches of every epoch are those one uninterrupted fit would see.
        """
        s = settings
        if not first_epoch:
            self.reset_optimizer()
            keras.utils.set_random_seed(s.seed)
        weights = sample_weights(self.task, y, s.class_weight) if s.class_weight else None
        batches, steps = rows_lib.shuffled_batches(
            x, self.task.targets(y), s.batch_size, s.seed, range(first_epoch, s.epochs),
            min_rows=self.replicas, weights=weights)
        validation = None if val is None else ExactValidation(
            lambda: self.predict(val[0]), val[1], self.task, keep_probs="probs" in record)
        keeper = _EpochWeights(self.trainable) if "weights" in record else None
        best = _BestEpoch(self.task.headline, self.trainable) if (
            keep == "best" and validation is not None) else None
        chosen = _AtEpoch(keep, self.trainable) if isinstance(keep, int) else None
        patience = (Patience(self.task.headline, s.patience, 1.0 / max(1, len(val[1])))
                    if s.patience and validation is not None and keep == "best" else None)
        # Validation first: everything after it (History, TensorBoard, checkpoints,
        # the best-epoch choice) reads its val_* numbers from the same logs.
        every = [c for c in (validation, keeper) if c is not None] + list(callbacks)
        every += [c for c in (best, chosen, patience) if c is not None]
        history = self.model.fit(batches.dataset, steps_per_epoch=steps, epochs=s.epochs,
                                 initial_epoch=first_epoch, callbacks=every, shuffle=False,
                                 verbose=0)
        del batches  # what the batches read from can go now (see `rows.Batches`)
        kept = first_epoch + len(history.epoch)
        for callback in (best, chosen):
            if callback is not None and callback.values is not None:
                self.set_trainable_weights(callback.values)
                kept = callback.epoch
        records = [{"epoch": e + 1, **{k: float(v[i]) for k, v in history.history.items()}}
                   for i, e in enumerate(history.epoch)]
        return Fit(history_frame(records), validation.scores if validation else [],
                   validation.probs if validation else [],
                   keeper.values if keeper else [], kept)


def _seed_variables(model: keras.Model) -> list:
    return [v for v in model.variables if "seed_generator" in v.path]


class Patience(keras.callbacks.Callback):
    """Stops a fit once ``val_<metric>`` (higher is better) has not improved by
    ``min_delta`` (one more validation row right) for ``patience`` epochs: Keras'
    ``EarlyStopping`` with its ``min_delta``, without its weight restoring, which
    `_BestEpoch` does for every fit alike."""

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0):
        super().__init__()
        self.metric, self.patience, self.min_delta = f"val_{metric}", patience, min_delta
        self.best, self.wait = -np.inf, 0

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.metric, np.nan))
        if np.isfinite(value) and value >= self.best + self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.model.stop_training = True


class _BestEpoch(keras.callbacks.Callback):
    """Remembers the trainable weights of the epoch with the best ``val_<metric>``
    (higher is better; NaN never wins)."""

    def __init__(self, metric: str, variables):
        super().__init__()
        self.metric, self.variables = f"val_{metric}", variables
        self.best, self.epoch, self.values = -np.inf, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.metric, np.nan))
        if np.isfinite(value) and value > self.best:
            self.best, self.epoch = value, epoch + 1
            self.values = [v.numpy() for v in self.variables]


class _AtEpoch(keras.callbacks.Callback):
    """Remembers the trainable weights after one given epoch (1-based): the epoch was
    chosen beforehand by cross-validation, which a small validation set cannot overrule."""

    def __init__(self, epoch: int, variables):
        super().__init__()
        self.epoch, self.variables, self.values = epoch, variables, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            self.values = [v.numpy() for v in self.variables]


def sample_weights(task: Task, y, class_weight: dict) -> np.ndarray:
    """Per-row weights from ``{class index: weight}``: a multi-label row gets the mean
    weight of its labels (1 when it has none)."""
    y = np.asarray(y)
    table = np.array([class_weight.get(c, 1.0) for c in range(len(task.class_names))])
    if task.kind == "multilabel":
        counts = y.sum(axis=1)
        return np.where(counts > 0, (y * table).sum(axis=1) / np.maximum(counts, 1), 1.0)
    return table[y.astype(int)]
