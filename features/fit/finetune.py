"""Second stage: fine-tune chosen blocks end to end on augmented images.

Resume rests on ``tf.train.Checkpoint`` + ``tf.train.CheckpointManager``: the
model, the optimizer, the epoch, the best score, the best epoch, the patience
counter and the history are saved together in one checkpoint after every epoch.
The manager writes the checkpoint's files first and then points its
``checkpoint`` state file at them (written by rename), so a kill at any moment
leaves either the previous or the new checkpoint, never a torn one. The best
epoch's weights live beside it as a TensorFlow checkpoint ``best-<epoch>``,
written completely before the checkpoint that names them, so they always match
it (TensorFlow's writer also fails cleanly on a full disk, where HDF5 can crash).

The starting head counts as epoch 0: its validation score is the first row of
the history and the baseline an epoch must beat to be kept, so fine-tuning never
exports a model that validates worse than the head it started from.
"""

import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import sys
import time
from typing import Callable, Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from features import backbone, distribute, precision, scenarios
from features.store import rows as rows_lib
from features.fit.settings import FinetuneSettings
from features.task import Task
from features.fit.loop import EpochLog, ExactValidation, history_frame, sample_weights
from pipeline import augment as augment_lib
from pipeline import input as input_lib
from pipeline import progress
from pipeline.errors import ConfigError

CHECKPOINT_FILE = "checkpoint"  # tf.train.CheckpointManager's state file
_BEST = "best-{:06d}"


class Checkpointer(keras.callbacks.Callback):
    """Best-model weights, early stopping and resumable state in one checkpoint.

    Args:
      directory: where the checkpoint and the best weights ``best-<epoch>`` (a TensorFlow
        checkpoint: ``.index`` and ``.data-*`` files) live.
      target: the model whose weights are saved (the classifier, even when the
        fitted model is a part of it or wraps it with an augmentation layer).
      optimizer: the fitted model's optimizer, whose state is checkpointed too.
      monitor: a logged metric such as "val_auc" (maximised) or "val_loss" (minimised).
      patience: epochs without improvement before stopping.
    """

    def __init__(self, directory: str, target: keras.Model, optimizer, monitor="val_auc",
                 patience=5):
        super().__init__()
        self.directory, self.target, self.optimizer = directory, target, optimizer
        if monitor not in ("val_auc", "val_accuracy", "val_loss", "val_map"):
            raise ConfigError(f"--monitor={monitor[4:]!r}: choose auc, accuracy, loss or map.")
        self.monitor, self.patience = monitor, patience
        self.mode = "min" if monitor.endswith("loss") else "max"
        self.validation = None  # an ExactValidation keeping probabilities, when set
        os.makedirs(directory, exist_ok=True)
        self.state = {"epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
                      "best": tf.Variable(np.nan, dtype=tf.float64, trainable=False),
                      "best_epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
                      "wait": tf.Variable(0, dtype=tf.int64, trainable=False),
                      "history": tf.Variable("[]", dtype=tf.string, trainable=False),
                      # Each epoch's validation probabilities (epoch 0 first), for an
                      # estimate that no epoch choice saw (`features.choose.honest`).
                      "probs": tf.Variable("[]", dtype=tf.string, trainable=False)}
        self.checkpoint = tf.train.Checkpoint(model=target, optimizer=optimizer, **self.state)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=1)

    # -- state ----------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self.state["epoch"].numpy())

    @property
    def best(self) -> Optional[float]:
        value = float(self.state["best"].numpy())
        return None if math.isnan(value) else value

    @property
    def best_epoch(self) -> int:
        return int(self.state["best_epoch"].numpy())

    @property
    def wait(self) -> int:
        return int(self.state["wait"].numpy())

    @property
    def history(self) -> list:
        return json.loads(self.state["history"].numpy().decode())

    def restore(self) -> int:
        """Loads the last complete checkpoint, if any; returns the epochs already done."""
        latest = self.manager.latest_checkpoint
        if latest is None:
            return 0
        try:
            # Built first, so that the optimizer's slots exist to be restored into.
            self.optimizer.build(self.target.trainable_variables)
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            if not tf.io.gfile.exists(self._best_path(self.best_epoch) + ".index"):
                raise ValueError(f"its best weights {self._best_path(self.best_epoch)} are "
                                 "missing")
        except (tf.errors.OpError, AssertionError, ValueError) as err:
            raise ConfigError(
                f"Cannot resume from {self.directory} ({err}). Rerun without --resume to "
                "start the fine-tuning afresh.") from err
        logging.info("Resumed fine-tuning after epoch %d (best %s %.4f at epoch %d).",
                     self.epoch, self.monitor, self.best if self.best is not None else
                     float("nan"), self.best_epoch)
        return self.epoch

    def _best_path(self, epoch: int) -> str:
        return os.path.join(self.directory, _BEST.format(epoch))

    def _write(self, write) -> None:
        """Runs a TensorFlow checkpoint write; if it fails (e.g. a full disk), removes the
        temporary folders it leaves (``*_temp``): what stays is complete."""
        try:
            write()
        except BaseException:
            for temp in glob.glob(os.path.join(self.directory, "*_temp")):
                shutil.rmtree(temp, ignore_errors=True)
            raise

    def _weights(self) -> tf.train.Checkpoint:
        # The weights alone (not the model object, which also tracks its optimizer).
        return tf.train.Checkpoint(weights=list(self.target.weights))

    def _save_best(self, epoch: int) -> None:
        self._write(lambda: self._weights().write(self._best_path(epoch)))

    def _commit(self, epoch: int) -> None:
        """One checkpoint for everything; then old best weights can go."""
        self._write(lambda: self.manager.save(checkpoint_number=epoch))
        keep = os.path.basename(self._best_path(self.best_epoch)) + "."
        for old in glob.glob(os.path.join(self.directory, "best-*")):
            if not os.path.basename(old).startswith(keep):
                os.remove(old)
        progress.report("finetune", self._resume_hint)

    def _resume_hint(self) -> str:
        """What a rerun would do, from the checkpoint on disk right now."""
        latest = tf.train.latest_checkpoint(self.directory)
        epoch = int(latest.rsplit("-", 1)[1]) if latest else 0
        return (f"continue the fine-tuning from epoch {epoch} with --stage=finetune --resume "
                f"(checkpoint in {self.directory})")

    @property
    def epoch_probs(self) -> list:
        """The validation probabilities after each epoch so far (epoch 0: the start)."""
        return [np.asarray(p, np.float64) for p in json.loads(self.state["probs"].numpy().decode())]

    def _record(self, row: dict, probs=None) -> None:
        history = self.history + [row]
        self.state["history"].assign(json.dumps(history))
        if probs is not None:
            kept = json.loads(self.state["probs"].numpy().decode())[:row["epoch"]]
            self.state["probs"].assign(json.dumps(kept + [np.round(
                np.asarray(probs, np.float64), 6).tolist()]))

    def resume_or_start(self, resume: bool, start_logs) -> int:
        """Restores the last checkpoint with ``resume`` (when there is one), else makes the
        starting weights epoch 0 with the validation (logs, probabilities) that
        ``start_logs()`` returns; returns the epochs already done."""
        if resume and self.manager.latest_checkpoint is not None:
            return self.restore()
        if resume:
            logging.warning("--resume: no fine-tuning checkpoint in %s (removed after the last "
                            "successful export, or never written); starting afresh.",
                            self.directory)
        logs, probs = start_logs()
        self.set_baseline(logs, probs)
        logging.info("Before fine-tuning: %s %.4f (epoch 0; an epoch must beat it).",
                     self.monitor, logs[self.monitor])
        return 0

    # -- callback -------------------------------------------------------------
    def set_baseline(self, logs: dict, probs=None) -> None:
        """The starting weights are epoch 0 with these validation logs (and
        probabilities): an epoch must beat them to be kept."""
        value = float(logs[self.monitor])
        self.state["best"].assign(value)
        self.state["best_epoch"].assign(0)
        self.state["wait"].assign(0)
        self.state["epoch"].assign(0)
        self._record({"epoch": 0, **{k: float(v) for k, v in logs.items()}}, probs)
        self._save_best(0)
        self._commit(0)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        value = logs.get(self.monitor)
        if value is None:
            raise ConfigError(f"Metric {self.monitor!r} is not logged; available: "
                              f"{', '.join(logs)}.")
        self.state["epoch"].assign(epoch + 1)
        self._record({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}},
                     self.validation.probs[-1] if self.validation is not None
                     and self.validation.probs else None)
        best = self.best
        improved = best is None or (value > best if self.mode == "max" else value < best)
        if improved:
            self._save_best(epoch + 1)  # before the checkpoint that names it
            self.state["best"].assign(float(value))
            self.state["best_epoch"].assign(epoch + 1)
            self.state["wait"].assign(0)
        else:
            self.state["wait"].assign_add(1)
        self._commit(epoch + 1)
        if self.wait >= self.patience:
            logging.info("Early stopping: no %s improvement for %d epochs (best %.4f at epoch "
                         "%d).", self.monitor, self.wait, self.best, self.best_epoch)
            self.model.stop_training = True

    def restore_best(self) -> None:
        """Loads the best epoch's weights into the target model."""
        self._weights().read(self._best_path(self.best_epoch)).assert_consumed()

    def summary(self) -> dict:
        """The run so far: history table, best and starting values, epochs."""
        history = history_frame(self.history)
        start = history[history.epoch == 0]
        return {"history": history, "best_epoch": self.best_epoch,
                "epoch_probs": self.epoch_probs,
                f"best_{self.monitor}": self.best, "epochs_run": self.epoch,
                "monitor": self.monitor, f"start_{self.monitor}":
                float(start[self.monitor].iloc[0]) if len(start) else None,
                "checkpoints": self}

    def remove(self) -> None:
        """Deletes the checkpoints (after a successful export: nothing left to resume)."""
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclasses.dataclass
class CachedViews:
    """Fine-tuning data from the feature cache: K augmented views of every training image
    at ``start_layer`` (view-major, as the cache returns them) and the plain
    validation features.

    An epoch is as many samples as there are training images, drawn without
    replacement from all K x N views (reshuffled every epoch), so it costs what an
    epoch from images costs in optimizer steps while showing fresh augmentations.
    """
    start_layer: str
    train_x: object
    train_y: np.ndarray
    val_x: object
    val_y: np.ndarray
    views: int


def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def _image_validation(model: keras.Model, task: Task, frame: pd.DataFrame, image_size: int,
                      batch_size: int) -> Callable[[], np.ndarray]:
    """Predicts the validation images (decoded once, kept in memory) with ``model``."""
    dataset = input_lib.eval_dataset(frame.path.tolist(), None, frame.name.tolist(),
                                     image_size, batch_size).map(lambda b: b["image"]).cache()
    run = distribute.sharded(lambda x: model(x, training=False), model.input.shape[1:])

    def predict():
        outputs = [np.asarray(run(batch)) for batch in dataset]
        return task.probabilities(np.concatenate(outputs) if outputs
                                  else np.zeros((0, model.output.shape[-1])))
    return predict


def _feature_validation(model: keras.Model, task: Task, x, batch_size: int):
    run = distribute.sharded(lambda v: model(v, training=False), model.input.shape[1:])

    def predict():
        outputs = [np.asarray(run(np.asarray(x[i:i + batch_size], np.float32)))
                   for i in range(0, len(x), batch_size)]
        return task.probabilities(np.concatenate(outputs))
    return predict


def finetune(classifier: backbone.Classifier, blocks, task: Task, train_frame: pd.DataFrame,
             val_frame: pd.DataFrame, settings: FinetuneSettings, *, workdir: str,
             cached: Optional[CachedViews] = None) -> dict:
    """Fine-tunes ``blocks`` of ``classifier``; leaves the best weights in it.

    Writes checkpoints into ``workdir/finetune/``. Returns a summary for
    ``metrics.json`` (with the history as a table and the `Checkpointer`).

    Args:
      settings: epochs, patience, monitor ("auc", "accuracy", "loss", "map"; default
        the task's headline), augmentation and where it runs ("pipeline": tf.data on
        the CPU; "model": an `Augment` layer in the training model, so on the
        accelerator; "auto": model with a GPU), resume, TensorBoard folder, ...
      cached: train from cached features instead of images (see `CachedViews`): only
        the part above ``cached.start_layer`` runs. Early stopping, the kept epoch,
        resume and the result are the same as from images.
    """
    s = settings
    monitor = s.monitor or task.headline
    ckpt_dir = os.path.join(workdir, "finetune")
    if not s.resume and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)  # a fresh run never mixes with an old one
    trainable = classifier.set_trainable(blocks)
    fit_model, validate, y_val, where = _fit_model(classifier, blocks, task, val_frame,
                                                   cached, s)
    # Recompile after changing what trains (Keras snapshots trainability at compile).
    fit_model.compile(optimizer=backbone.make_optimizer(
        s.optimizer, learning_rate(s, _steps(train_frame, cached, s))),
        loss=task.loss(s.label_smoothing), metrics=task.keras_metrics())
    checkpointer = Checkpointer(ckpt_dir, classifier.model, fit_model.optimizer,
                                "val_" + monitor, s.patience)
    def start_logs():
        probs = validate()
        return {f"val_{k}": v for k, v in task.scores(y_val, probs).items()}, probs
    initial_epoch = checkpointer.resume_or_start(s.resume, start_logs)
    train, steps = _training_data(task, train_frame, cached, s.replace(
        seed=s.seed + initial_epoch, epochs=max(1, s.epochs - initial_epoch)))
    logging.info("Fine-tuning %s (%d layers) for up to %d epochs, %d steps each, lr %g, "
                 "augment=%s from %s.", "+".join(blocks), len(trainable), s.epochs, steps,
                 s.learning_rate, s.augment, where)
    checkpointer.validation = ExactValidation(validate, y_val, task, keep_probs=True)
    callbacks = [checkpointer.validation, EpochLog("Fine-tuning", s.epochs), checkpointer]
    if s.tensorboard_dir:
        log_dir = os.path.join(s.tensorboard_dir, "finetune")
        if not initial_epoch:
            shutil.rmtree(log_dir, ignore_errors=True)  # continued across a resume only
        callbacks.insert(2, keras.callbacks.TensorBoard(log_dir))
    started = time.perf_counter()
    if initial_epoch < s.epochs and checkpointer.wait < s.patience:
        # On a terminal, Keras' bar shows each epoch's steps with the time left (an
        # epoch of the whole network is a minute); piped, the one line per epoch.
        fit_model.fit(train.dataset, epochs=s.epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
                      verbose=1 if sys.stdout.isatty() else 0)
    seconds = time.perf_counter() - started
    progress.clear("finetune")
    checkpointer.restore_best()
    at_limit = checkpointer.best_epoch >= s.epochs > 0
    if at_limit:
        logging.warning("Fine-tuning: still improving at the last epoch (%d): raise "
                        "--finetune_epochs.", s.epochs)
    return {**checkpointer.summary(), "seconds": round(seconds, 2),
            "trainable_layers": trainable, "resumed_from_epoch": initial_epoch,
            "epochs_allowed": s.epochs, "still_improving_at_limit": at_limit}


def _augments_in_model(settings: FinetuneSettings) -> bool:
    """Whether an `Augment` layer in the model augments (else the input pipeline)."""
    return settings.augment_on == "model" or (settings.augment_on == "auto"
                                              and gpu_available())


def _fit_model(classifier, blocks, task, val_frame, cached, settings: FinetuneSettings):
    """(the model ``fit`` trains, its validation predictor, validation labels, where the
    training data comes from): the part above the cached layer, the whole model with an
    augmentation layer in front, or the whole model."""
    s = settings
    if cached is not None:
        start = classifier.start_layer(blocks)
        if start != cached.start_layer:
            raise ConfigError(f"Blocks {','.join(blocks)} train from {start}, but the cached "
                              f"views are of {cached.start_layer}.")
        fit_model = classifier.training_model(start, precision.compile_convs())
        return (fit_model, _feature_validation(fit_model, task, cached.val_x, s.batch_size),
                cached.val_y, f"{cached.views} cached view(s) of {cached.start_layer}")
    validate = (_image_validation(classifier.model, task, val_frame, s.image_size,
                                  s.batch_size) if val_frame is not None else None)
    y_val = np.asarray(val_frame.label.tolist()) if val_frame is not None else None
    whole = classifier.training_model(scenarios.INPUT, precision.compile_convs())
    if _augments_in_model(s) and not augment_lib.get_preset(s.augment).is_identity:
        image = keras.Input(classifier.model.input.shape[1:], name="image")
        fit_model = keras.Model(image, whole(
            augment_lib.Augment(s.augment, seed=s.seed, name="augment")(image)),
            name="train_model")
        return fit_model, validate, y_val, "the model"
    return whole, validate, y_val, "the input pipeline"


def _training_data(task, train_frame, cached, settings: FinetuneSettings):
    """(training batches for ``settings.epochs`` epochs as `rows.Batches`, steps per
    epoch): from the cached views, or from the images through the augmented input
    pipeline."""
    s = settings
    if cached is not None:
        return rows_lib.shuffled_batches(
            cached.train_x, task.targets(cached.train_y), s.batch_size, s.seed, s.epochs,
            per_epoch=len(cached.train_y) // cached.views, min_rows=distribute.replicas(),
            weights=_class_weights(task, cached.train_y, s.class_weight))
    y_train = np.asarray(train_frame.label.tolist())
    steps = max(1, math.ceil(len(train_frame) / s.batch_size))
    dataset = input_lib.train_dataset(
        train_frame.path.tolist(), task.targets(y_train), train_frame.name.tolist(),
        s.image_size, s.batch_size, augment="none" if _augments_in_model(s) else s.augment,
        seed=s.seed, weights=_class_weights(task, y_train, s.class_weight))
    return rows_lib.Batches(dataset.map(input_lib.to_inputs_targets)), steps


def _steps(train_frame, cached, settings: FinetuneSettings) -> int:
    """Optimizer steps per epoch, as `_training_data` makes them."""
    s = settings
    if cached is not None:
        per_epoch = len(cached.train_y) // cached.views
        return len(rows_lib.batch_bounds(per_epoch, s.batch_size, distribute.replicas())) - 1
    return max(1, math.ceil(len(train_frame) / s.batch_size))


def learning_rate(settings: FinetuneSettings, steps_per_epoch: int):
    """The fine-tuning's learning rate: with ``warmup_epochs``, a linear warm-up from 0
    then a cosine to 0 at the end of ``schedule_epochs``; else the constant rate.

    Why a warm-up: a fresh Adam moves every weight by about the learning rate in its
    first steps, whatever its gradient, while its moment estimates are still empty;
    on a pretrained network that is a shove to every layer at once (docs/benchmarks.md,
    *Fine-tuning's first epoch*). The cosine ends the run at small steps, where the kept
    epochs usually are.
    """
    s = settings
    if not s.warmup_epochs:
        return s.learning_rate
    total = steps_per_epoch * (s.schedule_epochs or s.epochs)
    warm = max(1, min(total - 1, int(round(steps_per_epoch * s.warmup_epochs))))
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total - warm), warmup_target=s.learning_rate,
        warmup_steps=warm)


def _class_weights(task: Task, y, class_weight):
    return sample_weights(task, y, class_weight) if class_weight else None


def fit_fixed(classifier: backbone.Classifier, blocks, task: Task, frame: pd.DataFrame,
              cached: Optional[CachedViews], settings: FinetuneSettings) -> None:
    """Fine-tunes ``blocks`` for exactly ``settings.epochs`` epochs on ``frame`` (or its
    cached views), with no validation, early stopping or checkpoints: the refit on every
    label, for an epoch count a validated run already chose."""
    s = settings
    classifier.set_trainable(blocks, log=False)
    fit_model, _, _, _ = _fit_model(classifier, blocks, task, None, cached, s)
    fit_model.compile(optimizer=backbone.make_optimizer(
        s.optimizer, learning_rate(s, _steps(frame, cached, s))),
        loss=task.loss(s.label_smoothing), metrics=task.keras_metrics())
    train, steps = _training_data(task, frame, cached, s)
    fit_model.fit(train.dataset, epochs=s.epochs, steps_per_epoch=steps, shuffle=False,
                  verbose=0,
                  callbacks=[EpochLog("Refit fine-tuning", s.epochs)])
