"""Fine-tuning's resumable state: best-model weights, early stopping and the history.

Resume rests on ``tf.train.Checkpoint`` + ``tf.train.CheckpointManager``: the
model, the optimizer, the epoch, the best score, the best epoch, the patience
counter and the history are saved together in one checkpoint after every epoch.
The manager writes the checkpoint's files first and then points its
``checkpoint`` state file at them (written by rename), so a kill at any moment
leaves either the previous or the new checkpoint, never a torn one. The best
epoch's weights live beside it as a TensorFlow checkpoint ``best-<epoch>``,
written completely before the checkpoint that names them, so they always match
it (TensorFlow's writer also fails cleanly on a full disk, where HDF5 can crash).
"""

import glob
import json
import logging
import math
import os
import shutil
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from small_photo_classifier.features.fit.loop import history_frame
from small_photo_classifier.pipeline import progress
from small_photo_classifier.pipeline.errors import ConfigError

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
        # The model's weights as a list, not the model object: a nested head compiled by
        # another stage tracks its own optimizer under the model, and a later restore
        # would then wait for that optimizer's variables and read them from a checkpoint
        # file long deleted (the refit after --resume crashed on it).
        self.checkpoint = tf.train.Checkpoint(weights=list(target.weights), optimizer=optimizer,
                                              **self.state)
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
