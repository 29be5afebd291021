"""Second stage: fine-tune chosen blocks end to end on augmented images.

Each epoch's state, the best weights and early stopping live in one checkpoint
(`features.fit.checkpoint.Checkpointer`), so a killed run resumes where it stopped.
The starting head counts as epoch 0: its validation score is the first row of
the history and the baseline an epoch must beat to be kept, so fine-tuning never
exports a model that validates worse than the head it started from.
"""

import dataclasses
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

from small_photo_classifier.features import backbone, distribute, precision, scenarios
from small_photo_classifier.features.store import rows as rows_lib
from small_photo_classifier.features.fit.settings import FinetuneSettings
from small_photo_classifier.features.task import Task
from small_photo_classifier.features.fit.checkpoint import Checkpointer
from small_photo_classifier.features.fit.loop import EpochLog, ExactValidation, sample_weights
from small_photo_classifier.pipeline import augment as augment_lib
from small_photo_classifier.pipeline import input as input_lib
from small_photo_classifier.pipeline import progress
from small_photo_classifier.pipeline.errors import ConfigError

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
    callbacks = _callbacks(checkpointer, s, initial_epoch)
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


def _callbacks(checkpointer: Checkpointer, s: FinetuneSettings, initial_epoch: int) -> list:
    """What watches the epochs, in order: the exact validation (its scores are the logs
    the others read), the console line, TensorBoard, then the checkpoint."""
    callbacks = [checkpointer.validation, EpochLog("Fine-tuning", s.epochs), checkpointer]
    if s.tensorboard_dir:
        log_dir = os.path.join(s.tensorboard_dir, "finetune")
        if not initial_epoch:
            shutil.rmtree(log_dir, ignore_errors=True)  # continued across a resume only
        callbacks.insert(2, keras.callbacks.TensorBoard(log_dir))
    return callbacks


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
            cached.train_x, task.targets(cached.train_y), s.batch_size, s.seed, range(s.epochs),
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
