"""Training the final model: the chosen scenario's head put back (fitted first when the
heads stage only cross-validated it), its fine-tuning (from cached augmented views when
the tuned blocks start above a cached layer, else from images), and the refit on every
label with the epochs chosen before (`workflow.train.export` decides what is exported)."""

import logging
import os
import time
from typing import Optional

import numpy as np
import pandas as pd

from small_photo_classifier.features.fit import finetune as finetune_lib
from small_photo_classifier.features.fit import heads as heads_lib
from small_photo_classifier.features.fit.loop import restore
from small_photo_classifier.features.fit.settings import FinetuneSettings, FitSettings
from small_photo_classifier.features.store import cache as cache_lib
from small_photo_classifier.features.store import rows as rows_lib
from small_photo_classifier.workflow.base import console, state as state_lib
from small_photo_classifier.workflow.base.config import (CacheConfig, FinetuneConfig, HeadsConfig,
                                                         RuntimeConfig)
from small_photo_classifier.workflow.train.job import Features, Job, cache_spec, fit_settings
from small_photo_classifier.workflow.views import plots


def load_head(job: Job, heads: HeadsConfig, cache: CacheConfig, runtime: RuntimeConfig,
              config: FinetuneConfig, scenario: str) -> None:
    """Puts ``scenario``'s cache-trained head into the classifier (fitting it first when
    the heads stage cross-validated it but did not fit it)."""
    head_weights = heads_lib.weights_file(job.run.path, scenario)
    if scenario not in job.heads and not os.path.isfile(head_weights):
        fit_unfitted_head(job, heads, cache, runtime, config.view_preset, scenario)
    heads_lib.load_scenario_weights(job.classifier, scenario, head_weights,
                                    job.heads.get(scenario))


def fit_unfitted_head(job: Job, heads: HeadsConfig, cache: CacheConfig, runtime: RuntimeConfig,
                      view_preset: str, scenario: str) -> None:
    """Fits a scenario the heads stage cross-validated but did not fit (CV ranked another
    first) on the whole training split, to the epoch its CV chose, and saves its weights
    as the heads stage would have: e.g. for ``--stage=finetune --scenario=C``."""
    head = state_lib.load(job.run.path).heads.get(scenario)
    if head is None:
        return  # never trained: loading says which stage to run
    logging.info("Scenario %s was cross-validated but not fitted by the heads stage: fitting "
                 "it now on the training split's cached features to its CV epoch %d.",
                 scenario, head.epoch)
    config = heads_lib.HeadConfig.for_scenario(scenario, head.learning_rate,
                                               optimizer=head.optimizer, dropout=head.dropout,
                                               views=head.views)
    train, val, views = Features(job, cache, runtime.batch_size).split(head.views, view_preset)
    restore(job.classifier.model, job.initial)
    result = heads_lib.fit_head(
        job.classifier, config, job.task,
        heads_lib.FeatureSplit(train, job.y_train, views), heads_lib.FeatureSplit(val, job.y_val),
        fit_settings(job, heads, cache, runtime), epoch=head.epoch)
    heads_lib.save_head_weights(job.classifier, scenario, job.run.path)
    job.heads[scenario] = result.weights


def cached_views(job: Job, config: FinetuneConfig, cache: CacheConfig, batch_size: int,
                 blocks, frame: Optional[pd.DataFrame] = None):
    """`finetune.CachedViews` for --finetune_views=K when the blocks start above a cached
    layer (extracting the views once), else None: the whole network trains from images.
    ``frame``: the images to train on (default the training split)."""
    start = job.classifier.start_layer(blocks)
    if config.views <= 0:
        return None
    if start not in cache_lib.cached_layers(job.model.include_top, job.classifier.net):
        logging.info("Fine-tuning blocks %s reach below every cached layer: training the whole "
                     "network from images (--finetune_views applies above a cached layer).",
                     ",".join(blocks))
        return None
    features = Features(job, cache, batch_size)
    frame = job.train if frame is None else frame
    y = np.asarray(frame.label.tolist())
    views = 1 if config.augment == "none" else config.views  # K identical views are one
    preset = "none" if config.augment == "none" else config.view_preset
    layers = None
    if preset != "none":
        # Views of the one layer the blocks train from (VGG16 at Kaggle size: 1.2 GB
        # instead of 6.0 GB for every cached layer), unless views of every layer
        # (--cache_augmented_views, the same preset) already hold them all.
        held = cache_lib.planned_bytes(job.classifier, cache_spec(job, cache, preset), frame,
                                       cache.cache_dir, views) == 0
        layers = None if held else (start,)
    train_x = features.of(frame, views if preset != "none" else 0, preset, layers)[start]
    _, val = features.split()[:2]
    return finetune_lib.CachedViews(start, train_x, np.concatenate([y] * views), val[start],
                                    job.y_val, views)


def finetune(job: Job, config: FinetuneConfig, cache: CacheConfig, scenario: str, blocks,
             fine: FinetuneSettings, what: Optional[str] = None) -> dict:
    """Runs the fine-tuning; writes its history CSV and plot; returns its summary.
    ``what``: what is fine-tuned, for the plot (default: the scenario)."""
    started = time.perf_counter()
    cached = cached_views(job, config, cache, fine.batch_size, blocks)
    # Fine-tuning compiles a new model: one trace of a new step function. TensorFlow
    # keys its retracing warning by the code, not the function, so after the heads',
    # folds' and bag's own compiles (one trace each) it reads as a leak.
    with console.expected_retracing():
        ft = finetune_lib.finetune(job.classifier, blocks, job.task, job.train, job.val,
                                   fine, workdir=job.run.path, cached=cached)
    # The whole stage, view extraction included, so both ways compare honestly.
    ft["fit_seconds"] = ft.pop("seconds")
    ft["seconds"] = round(time.perf_counter() - started, 2)
    ft["views"] = cached.views if cached else 0
    history = ft.pop("history")
    job.run.write_csv(history, "history_finetune.csv")
    plots.history(
        history, job.run.file("finetune_history.png"),
        title=f"Fine-tuning {what or 'scenario ' + scenario} (epoch 0 = scenario {scenario}'s "
              "head)",
        kept_epoch=ft["best_epoch"],
        metrics=tuple(dict.fromkeys(("accuracy", "loss", job.task.headline))))
    return ft


def refit(job: Job, config: FinetuneConfig, cache: CacheConfig, scenario: str, blocks,
          fit: FitSettings, fine: FinetuneSettings) -> dict:
    """Trains the exported model again on training + validation images: the head for the
    epochs cross-validation chose (from the same initial weights), then the fine-tuning
    for the epochs the validation run kept (``fine.epochs``). Returns what was done, for
    metrics.json."""
    everything = pd.concat([job.train, job.val], ignore_index=True)
    y = np.asarray(everything.label.tolist())
    head = state_lib.load(job.run.path).heads.get(scenario) or state_lib.HeadState(fit.epochs)
    epochs = int(head.epoch or fit.epochs)
    config_head = heads_lib.HeadConfig.for_scenario(
        scenario, head.learning_rate, optimizer=head.optimizer, dropout=head.dropout)
    restore(job.classifier.model, job.initial)
    features = Features(job, cache, fit.batch_size)
    start = job.classifier.start_layer(config_head.row.blocks)
    x, y_rows = features.of(everything)[start], y
    views = head.views
    if views:
        # The chosen epoch count is of epochs over plain rows plus K cached views of each
        # image: the refit's epochs are of the same rows, or it would train (1+K)x less.
        x, y_rows = rows_lib.with_views(
            x, y, features.of(everything, views, config.view_preset)[start])
    started = time.perf_counter()
    # A new trainer compiles Keras' step function again, and TensorFlow counts every
    # compile of that one closure as a retrace of it: after cross-validation's and the
    # bag's fits that reads as a leak, but it is one trace of a new function.
    with console.expected_retracing(), config_head.trainer(
            job.classifier, job.task, label_smoothing=fit.label_smoothing) as trainer:
        trainer.fit(x, y_rows, fit.replace(epochs=epochs), keep=None)
    done = {"rows": len(y), "head_rows": len(y_rows), "head_views": views,
            "head_epochs": epochs, "finetune_epochs": fine.epochs}
    if fine.epochs > 0:
        cached = cached_views(job, config, cache, fine.batch_size, blocks, everything)
        finetune_lib.fit_fixed(job.classifier, blocks, job.task, everything, cached, fine)
    done["seconds"] = round(time.perf_counter() - started, 2)
    logging.info("Refit on all %d labelled images (training + validation): %d head epoch(s), "
                 "%d fine-tuning epoch(s), %.1f s.", len(y), epochs, fine.epochs,
                 done["seconds"])
    return done
