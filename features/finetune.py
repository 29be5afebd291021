"""Second stage: fine-tune chosen blocks end to end on augmented images.

Checkpointing is done by `Checkpointer` rather than Keras' ModelCheckpoint +
EarlyStopping + BackupAndRestore because a resumable run needs their state
(best value, patience counter, epoch, optimizer moments) saved *together* and
*atomically*: each epoch goes into a fresh ``ckpt-<epoch>/`` folder and only
then does ``state.json`` (written by rename) point at it, so a kill at any
moment leaves either the previous or the new checkpoint, never a torn one.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from typing import Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from features import backbone
from pipeline import augment as augment_lib
from pipeline import input as input_lib
from pipeline import progress
from pipeline.atomic import atomic_path, atomic_write_text
from pipeline.errors import ConfigError

STATE_FILE = "state.json"
BEST_WEIGHTS = "best.weights.h5"


class Checkpointer(keras.callbacks.Callback):
    """Best-model checkpoint, early stopping and resumable last-epoch state, in one.

    Args:
      directory: where ``state.json``, ``ckpt-*/`` and ``best.weights.h5`` live.
      target: the model whose weights are saved (the classifier, even when the
        fitted model wraps it with an augmentation layer).
      optimizer: the fitted model's optimizer, whose state is checkpointed too.
      monitor: a logged metric such as "val_auc" (maximised) or "val_loss" (minimised).
      patience: epochs without improvement before stopping.
    """

    def __init__(self, directory: str, target: keras.Model, optimizer, monitor="val_auc",
                 patience=5):
        super().__init__()
        self.directory, self.target, self.optimizer = directory, target, optimizer
        self.monitor, self.patience = monitor, patience
        self.mode = "min" if monitor.endswith("loss") else "max"
        self.best, self.best_epoch, self.wait, self.epoch = None, 0, 0, 0
        self.history = []
        os.makedirs(directory, exist_ok=True)

    # -- state ----------------------------------------------------------------
    def state_path(self):
        return os.path.join(self.directory, STATE_FILE)

    def restore(self) -> int:
        """Loads the last complete checkpoint, if any; returns the epochs already done."""
        if not os.path.isfile(self.state_path()):
            return 0
        try:
            with open(self.state_path(), encoding="utf-8") as f:
                state = json.load(f)
            ckpt = os.path.join(self.directory, state["checkpoint"])
            # Built first, so that Keras can also restore it from a compiled model's file.
            self.optimizer.build(self.target.trainable_variables)
            self.target.load_weights(os.path.join(ckpt, "model.weights.h5"))
            opt = np.load(os.path.join(ckpt, "optimizer.npz"))
            if len(opt.files) != len(self.optimizer.variables):
                raise ValueError(f"optimizer has {len(self.optimizer.variables)} variables, "
                                 f"checkpoint {len(opt.files)}")
            for i, var in enumerate(self.optimizer.variables):
                var.assign(opt[f"v{i}"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"Cannot resume from {self.directory} ({err}). Rerun without --resume to "
                "start the fine-tuning afresh.") from err
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.wait, self.epoch = state["wait"], state["epoch"]
        self.history = state.get("history", [])
        logging.info("Resumed fine-tuning after epoch %d (best %s %.4f at epoch %d).",
                     self.epoch, self.monitor, self.best if self.best is not None else
                     float("nan"), self.best_epoch)
        return self.epoch

    def _save(self, epoch):
        name = f"ckpt-{epoch:06d}"
        final = os.path.join(self.directory, name)
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            self.target.save_weights(os.path.join(tmp, "model.weights.h5"))
            np.savez(os.path.join(tmp, "optimizer.npz"),
                     **{f"v{i}": np.asarray(v.numpy()) for i, v in
                        enumerate(self.optimizer.variables)})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: no torn checkpoint
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(self.state_path(), json.dumps({
            "checkpoint": name, "epoch": epoch, "best": self.best, "best_epoch": self.best_epoch,
            "wait": self.wait, "monitor": self.monitor, "history": self.history}, indent=1))
        progress.report("finetune", f"continue the fine-tuning from epoch {epoch} with "
                                    f"--stage=finetune --resume (checkpoint in {self.directory})")
        for old in os.listdir(self.directory):
            if old.startswith("ckpt-") and old != name:
                shutil.rmtree(os.path.join(self.directory, old), ignore_errors=True)

    # -- callback -------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        value = logs.get(self.monitor)
        if value is None:
            raise ConfigError(f"Metric {self.monitor!r} is not logged; available: "
                              f"{', '.join(logs)}.")
        self.epoch = epoch + 1
        self.history.append({"epoch": self.epoch, **{k: float(v) for k, v in logs.items()}})
        improved = self.best is None or (value > self.best if self.mode == "max"
                                         else value < self.best)
        if improved:
            self.best, self.best_epoch, self.wait = float(value), self.epoch, 0
            with atomic_path(os.path.join(self.directory, BEST_WEIGHTS)) as tmp:
                self.target.save_weights(tmp)
        else:
            self.wait += 1
        self._save(self.epoch)
        if self.wait >= self.patience:
            logging.info("Early stopping: no %s improvement for %d epochs (best %.4f at epoch "
                         "%d).", self.monitor, self.wait, self.best, self.best_epoch)
            self.model.stop_training = True

    def set_baseline(self, value: float):
        """Counts the starting weights as epoch 0 with ``value``: an epoch must beat
        them to be kept, so fine-tuning never exports a model that validates worse
        than the head it started from."""
        self.best, self.best_epoch, self.wait = float(value), 0, 0
        with atomic_path(os.path.join(self.directory, BEST_WEIGHTS)) as tmp:
            self.target.save_weights(tmp)

    def restore_best(self):
        """Loads the best epoch's weights into the target model."""
        path = os.path.join(self.directory, BEST_WEIGHTS)
        if os.path.isfile(path):
            with warnings.catch_warnings():
                # best.weights.h5 of epoch 0 was saved before the optimizer was built;
                # only the model's weights matter here.
                warnings.filterwarnings("ignore", message="Skipping variable loading")
                self.target.load_weights(path)


@dataclasses.dataclass
class CachedViews:
    """Fine-tuning data from the feature cache: K augmented views of every training image
    at ``start_layer`` (view-major, as `cache.load_features` returns them) and the plain
    validation features.

    An epoch is as many samples as there are training images, drawn without
    replacement from all K x N views (reshuffled every epoch), so it costs what an
    epoch from images costs in optimizer steps while showing fresh augmentations.
    """
    start_layer: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    views: int

    def datasets(self, batch_size: int, seed: int, epochs: int):
        """(training batches for ``epochs`` epochs of one image's worth each, validation
        batches) for ``Model.fit``, with the steps per epoch."""
        from features import heads
        images = len(self.train_y) // self.views
        train, steps = heads.shuffled_batches(self.train_x, self.train_y, batch_size, seed,
                                              epochs, per_epoch=images)
        val = heads.sequential_batches(self.val_x, self.val_y, batch_size)
        return train, val, steps


def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def finetune(classifier: backbone.Classifier, blocks, train_frame: pd.DataFrame,
             val_frame: pd.DataFrame, *, workdir: str, image_size: int, batch_size: int,
             augment: str, learning_rate: float, epochs: int, patience: int,
             monitor: str = "auc", seed: int = 0, resume: bool = False,
             augment_on: str = "auto", optimizer: str = "adam",
             tensorboard_dir: Optional[str] = None, cached: Optional["CachedViews"] = None,
             verbose: int = 1) -> dict:
    """Fine-tunes ``blocks`` of ``classifier``; leaves the best weights in it.

    Writes ``finetune/`` (checkpoints) and ``history_finetune.csv`` into ``workdir``.

    Args:
      monitor: "auc" or "accuracy" (validation).
      cached: train from cached features instead of images (see `CachedViews`):
        only the part above ``cached.start_layer`` runs, which is the whole
        trainable part when ``blocks`` start above that layer. Early stopping,
        best-model choice, resume and the result are the same as from images.
      tensorboard_dir: when given, TensorBoard logs go to ``<tensorboard_dir>/finetune``
        (kept across a resume, so the curves continue).
      augment_on: "pipeline" (tf.data, on the CPU), "model" (an `Augment` layer
        in the training model, so on the accelerator), or "auto" (model when a
        GPU is visible).

    Returns a summary dict for ``metrics.json``.
    """
    if monitor not in ("auc", "accuracy", "loss"):
        raise ConfigError(f"--monitor={monitor!r}: choose auc, accuracy or loss.")
    preset = augment_lib.get_preset(augment)
    ckpt_dir = os.path.join(workdir, "finetune")
    if not resume and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)  # a fresh run never mixes with an old one
    trainable = backbone.set_trainable(classifier, blocks)
    on_model = augment_on == "model" or (augment_on == "auto" and gpu_available())
    if cached is not None:
        start = backbone.start_layer(blocks, classifier.include_top)
        if start != cached.start_layer:
            raise ConfigError(f"Blocks {','.join(blocks)} train from {start}, but the cached "
                              f"views are of {cached.start_layer}.")
        fit_model = classifier.model_from(start)
    elif on_model and not preset.is_identity:
        image = keras.Input(classifier.model.input.shape[1:], name="image")
        fit_model = keras.Model(image, classifier.model(
            augment_lib.Augment(augment, seed=seed, name="augment")(image)), name="train_model")
    else:
        fit_model = classifier.model
    # Recompile after changing what trains (Keras snapshots trainability at compile).
    backbone.compile_model(fit_model, learning_rate, optimizer)
    checkpointer = Checkpointer(ckpt_dir, classifier.model, fit_model.optimizer,
                                "val_" + monitor, patience)
    initial_epoch = checkpointer.restore() if resume else 0
    steps = max(1, math.ceil(len(train_frame) / batch_size))
    if cached is not None:
        train, val, steps = cached.datasets(batch_size, seed + initial_epoch,
                                            max(1, epochs - initial_epoch))
    else:
        train = input_lib.train_dataset(
            train_frame.path.tolist(), train_frame.label.tolist(), train_frame.name.tolist(),
            image_size, batch_size, augment=augment, seed=seed + initial_epoch,
            augment_in_pipeline=not on_model).map(input_lib.to_inputs_targets)
        val = input_lib.eval_dataset(
            val_frame.path.tolist(), val_frame.label.tolist(), val_frame.name.tolist(),
            image_size, batch_size).map(input_lib.to_inputs_targets)
    start_value = None
    if not resume:
        start_value = float(fit_model.evaluate(val, verbose=0, return_dict=True)[monitor])
        checkpointer.set_baseline(start_value)
        logging.info("Before fine-tuning: val_%s %.4f (epoch 0; an epoch must beat it).",
                     monitor, start_value)
    where = (f"{cached.views} cached view(s) of {cached.start_layer}" if cached is not None
             else "the model" if on_model else "the input pipeline")
    logging.info("Fine-tuning %s (%d layers) for up to %d epochs, %d steps each, lr %g, "
                 "augment=%s from %s.", "+".join(blocks), len(trainable), epochs, steps,
                 learning_rate, augment, where)
    callbacks = [checkpointer]
    if tensorboard_dir:
        log_dir = os.path.join(tensorboard_dir, "finetune")
        if not resume:
            shutil.rmtree(log_dir, ignore_errors=True)
        callbacks.append(keras.callbacks.TensorBoard(log_dir))
    started = time.perf_counter()
    if not resume:
        progress.report("finetune", "start the fine-tuning again (no epoch had finished)")
    if initial_epoch < epochs and checkpointer.wait < patience:
        fit_model.fit(train, validation_data=val, epochs=epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
                      verbose=verbose)
    seconds = time.perf_counter() - started
    progress.clear("finetune")
    checkpointer.restore_best()
    history = pd.DataFrame(checkpointer.history)
    return {"history": history, "best_epoch": checkpointer.best_epoch,
            "best_" + checkpointer.monitor: checkpointer.best, "epochs_run": checkpointer.epoch,
            "seconds": round(seconds, 2), "trainable_layers": trainable,
            "resumed_from_epoch": initial_epoch, "start_" + checkpointer.monitor: start_value}
