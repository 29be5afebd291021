"""What every stage of a training run shares, and how it is prepared.

`prepare` finds and checks the data, splits it, chooses the precision, builds
the classifier and the cross-validation folds, and opens the run folder; `Job`
carries the result. `Features` loads the cached features a stage needs
(extracting what is missing), in memory or streamed from HDF5.
"""

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import pandas as pd

from small_photo_classifier.features import backbone, distribute, networks, precision
from small_photo_classifier.features.store import cache as cache_lib, extract
from small_photo_classifier.features.store.rows import take
from small_photo_classifier.features.choose import cv as cv_lib
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.fit.settings import FinetuneSettings, FitSettings
from small_photo_classifier.features.task import Task
from small_photo_classifier.features.fit.loop import snapshot
from small_photo_classifier.features.weights import weights_identity
from small_photo_classifier.pipeline import (diskspace, discovery, groups as groups_lib, labels,
                                             limits, scan, split)
from small_photo_classifier.pipeline.errors import ConfigError, UserError
from small_photo_classifier.workflow.base import config as config_lib, console
from small_photo_classifier.workflow.base.clock import StageClock
from small_photo_classifier.workflow.base.config import (CacheConfig, DataConfig, FinetuneConfig,
                                                         HeadsConfig, ModelConfig, RuntimeConfig)
from small_photo_classifier.workflow.base.outputs import RunFolder

# Below this many validation images, --cv_folds=auto cross-validates.
SMALL_VAL = 100
AUTO_FOLDS = 5


@dataclasses.dataclass
class Job:
    """What the stages share: data, split, task, model, where outputs go."""
    precision: precision.Precision
    dataset: discovery.Dataset
    task: Task
    frame: pd.DataFrame
    train: pd.DataFrame
    val: pd.DataFrame
    classifier: backbone.Classifier
    run: RunFolder
    folds: Optional[list]
    model: ModelConfig
    seed: int
    initial: object = None       # the classifier's starting state (training.snapshot)
    class_weight: Optional[dict] = None  # --class_weight, resolved for this data
    board: Optional[str] = None  # TensorBoard folder, None with --notensorboard
    engine: object = None  # a features.serve.ray_engine.RayEngine with --ray_address
    said: set = dataclasses.field(default_factory=set)  # lines shown once on the terminal
    # Cached features this run has read (see `Features`): each file is opened and its rows
    # CRC-checked once, however many steps use them.
    loaded: dict = dataclasses.field(default_factory=dict)
    # Trained head weights by scenario (the part above its cached layer), kept in memory
    # by the heads stage so that fine-tuning in the same run does not read them back.
    heads: dict = dataclasses.field(default_factory=dict)
    # --backbones candidates that could not be built: (choice, size, why).
    failed_backbones: list = dataclasses.field(default_factory=list)
    # The run's seconds and peak memory by stage (metrics.json, console, report).
    clock: StageClock = dataclasses.field(default_factory=StageClock)
    max_pixels: int = limits.MAX_PIXELS  # --max_pixels: a larger image is a bad image
    pending_bag: object = None  # the bag's making, waiting for the whole network (bagging)

    @property
    def y_train(self) -> np.ndarray:
        return labels_of(self.task, self.train)

    @property
    def y_val(self) -> np.ndarray:
        return labels_of(self.task, self.val)

    @property
    def train_groups(self) -> Optional[np.ndarray]:
        """The group of each training photo (--groups, --group_pattern), or None."""
        return groups_lib.of(self.train)

    def make_folds(self, k: int) -> list:
        """K stratified folds of the training split, every group in one fold: what any
        step that cross-validates beyond ``folds`` (the curve, the backbone comparison,
        the augmentation choice, the sweep) splits by."""
        return cv_lib.make_folds(self.y_train, k, self.seed, self.task, self.train_groups)

    def probe_folds(self) -> Optional[list]:
        """The folds the linear probe chooses its variant on: the run's CV folds, else
        (with groups) its inner folds made of whole groups; None: the probe's own."""
        groups = self.train_groups
        if self.folds or groups is None:
            return self.folds
        _, smallest = task_lib.smallest_class(self.task, self.y_train)
        return self.make_folds(max(2, min(5, smallest, len(set(groups)))))


def labels_of(task: Task, frame: pd.DataFrame) -> np.ndarray:
    """The labels of a frame in the task's encoding (see `features.task`)."""
    return np.asarray(frame.label.tolist()) if len(frame) else np.zeros(0, int)


@dataclasses.dataclass
class _Split:
    """The photos (with their groups), the two sides and the CV folds of a run."""
    frame: pd.DataFrame
    train: pd.DataFrame
    val: pd.DataFrame
    folds: Optional[list]
    grouped: Optional[groups_lib.Summary]


def _split(data: DataConfig, heads: HeadsConfig, task: Task, frame: pd.DataFrame,
           dataset) -> _Split:
    """The groups (--groups, --group_pattern), the validation split and the CV folds,
    each group on one side of both; every error here comes before anything is
    written."""
    frame, grouped = groups_lib.assign(
        frame, data.groups, data.group_pattern, os.path.join(
            dataset.data_dir, discovery.LABELS_CSV) if dataset.layout == "kaggle" else None)
    train, val = split.split_train_val(frame, resolve_val_size(data.val_size, len(frame)),
                                       data.seed)
    folds = resolve_folds(heads, task, labels_of(task, train), len(val), data.seed,
                          groups_lib.of(train))
    return _Split(frame, train, val, folds, grouped)


def resplit(data: DataConfig, heads: HeadsConfig, job: "Job", frame: pd.DataFrame,
            grouped: groups_lib.Summary) -> _Split:
    """The split and folds made again for ``frame``'s groups, found after `prepare`
    (`workflow.train.near_groups`); split.csv and the groups' record rewritten."""
    parts = dataclasses.replace(_split(data, heads, job.task, frame, job.dataset),
                                grouped=grouped)
    _write_split(job.run, job.task, parts, data.seed)
    return parts


def _write_split(run: RunFolder, task: Task, parts: _Split, seed: int) -> None:
    """split.csv, and the groups in the log and metrics.json."""
    frame, val = parts.frame, parts.val
    table = frame.assign(subset=np.where(frame.name.isin(set(val.name)), "val", "train"),
                         label=[labels.label_text(task.kind, task.class_names, v)
                                for v in frame.label])
    run.write_csv(_with_folds(table, parts.train, parts.folds), "split.csv")
    if parts.grouped is not None:
        logging.info("Groups: %s.", parts.grouped.sentence())
    run.update_metrics("groups", parts.grouped.as_dict() if parts.grouped else None)
    logging.info("Split: %d train, %d validation (seed %d) -> %s", len(parts.train), len(val),
                 seed, run.file("split.csv"))


def _with_folds(table: pd.DataFrame, train: pd.DataFrame, folds) -> pd.DataFrame:
    """split.csv's columns: name, label, subset, path, then the group (with groups) and
    the cross-validation fold that held each training photo out (with CV)."""
    columns = ["name", "label", "subset", "path"] + (
        [groups_lib.COLUMN] if groups_lib.COLUMN in table.columns else [])
    table = table[columns]
    if folds:  # (1-based: fold 1 .. K)
        held_in = dict(zip(train.name, cv_lib.fold_of(folds, len(train)) + 1))
        table = table.assign(fold=[held_in.get(n, "") for n in table.name])
    return table


def resolve_val_size(text: str, n: int):
    """``--val_size`` for ``n`` images ('auto': 200 from 1,000 images, else 20%)."""
    value = config_lib.parse_val_size(text)
    if value != "auto":
        return value
    value = 200 if n >= 1000 else 0.2
    logging.info("--val_size=auto: %s of %d images, each class in its share of the data "
                 "(200 needs at least 1,000; pass --val_size to choose, 100+100 for the "
                 "reference's balanced split).", "200" if value == 200 else "20%", n)
    return value


def resolve_folds(heads: HeadsConfig, task: Task, y_train, n_val: int, seed: int,
                  groups=None):
    """``--cv_folds`` as index pairs into the training split (each group in one fold),
    or None."""
    k = config_lib.parse_folds(heads.cv_folds)
    if k == "auto":
        if n_val >= SMALL_VAL:
            return None
        _, smallest = task_lib.smallest_class(task, y_train)
        if smallest < AUTO_FOLDS:
            logging.warning("Validation set is small (%d images) but a class has only %d "
                            "training images, too few for %d-fold CV: choosing by validation "
                            "scores.", n_val, smallest, AUTO_FOLDS)
            return None
        logging.info("Validation set is small (%d < %d images): scenarios and epochs are "
                     "chosen by %d-fold CV on the training split (mean +- std), not by the "
                     "validation set alone. --cv_folds=0 turns this off.", n_val, SMALL_VAL,
                     AUTO_FOLDS)
        k = AUTO_FOLDS
    if k == 0:
        return None
    return cv_lib.make_folds(y_train, k, seed, task, groups)


def run_folder_of(workdir: Optional[str], data_dir: str) -> str:
    """The run folder: ``--workdir``, else ``runs/<the data folder's name>``."""
    return workdir or os.path.join(
        "runs", os.path.basename(os.path.abspath(data_dir).rstrip(os.sep)))


def prepare(data: DataConfig, model: ModelConfig, heads: HeadsConfig, cache: CacheConfig,
            runtime: RuntimeConfig, flag_values: dict, dataset=None) -> Job:
    """Discovers and checks the data (unless ``dataset`` is given: `discover` ran before
    TensorFlow started), splits it, builds the classifier."""
    dataset = dataset or config_lib.discover(data, cache)
    task = Task(dataset.kind, dataset.class_names)
    logging.info("Task: %s (%s; --task to override).", task.describe(),
                 "as asked" if data.task else "detected from the data")
    workdir = run_folder_of(runtime.workdir, dataset.data_dir)
    fresh = not os.path.isdir(workdir)
    run = RunFolder(workdir)
    console.log_to_file(run.file("train.log"))
    try:
        # Every check before anything but the log is written: a run that stops here
        # leaves no half-made run folder behind.
        frame = scan.filter_bad_images(dataset.frame, model.image_size, data.on_bad_image,
                                       run.file("bad_images.csv"),
                                       memo_path=os.path.join(cache.cache_dir,
                                                              "preflight.json"),
                                       max_pixels=data.max_pixels)
        parts = _split(data, heads, task, frame, dataset)
    except UserError:
        if fresh:
            logging.info("Nothing was trained or written: %s holds only this log (train.log).",
                         workdir)
        raise
    _write_split(run, task, parts, data.seed)
    frame, train, val, folds, y_train = (parts.frame, parts.train, parts.val, parts.folds,
                                         labels_of(task, parts.train))
    # Before the model is built: layers take the global policy when they are created.
    chosen = precision.resolve_and_apply(runtime.precision)
    # A later stage (curve, label_next) writes its own settings file: run_config.json
    # keeps the settings the model was trained with.
    run.write_json({**flag_values, "image_size": model.image_size,
                    "image_size_reason": model.image_size_reason,
                    "data_dir": dataset.data_dir, "workdir": workdir,
                    "precision_resolved": dataclasses.asdict(chosen),
                    "precision_parts": precision.parts(chosen.policy),
                    "replicas": distribute.replicas(), "task": task.kind,
                    "command": console.command_line()}, runtime.config_file)
    classifier, model, failed = _first_buildable(model, task, data.seed)
    logging.info("Input size: %d px (%s).", model.image_size, model.image_size_reason)
    if model.backbone.contract:
        logging.info("Input of %s: %s (%s; another with --backbone=PATH:CONTRACT).",
                     os.path.basename(model.backbone.name), networks.CONTRACTS[
                         model.backbone.contract], "named" if model.backbone.contract_named
                     else "the file's first layer scales its input itself")
    classifier.model.summary(print_fn=lambda line, *a, **k: console.DETAIL.info(line),
                             expand_nested=True)
    weights = task_lib.class_weights(task, y_train, heads.class_weight)
    if weights:
        logging.info("Class weights (--class_weight=%s): %s.", heads.class_weight, ", ".join(
            f"{task.class_names[c]} {w:.2f}" for c, w in weights.items()))
    return Job(chosen, dataset, task, frame, train, val, classifier, run, folds, model,
               data.seed, initial=snapshot(classifier.model), class_weight=weights,
               board=run.file("tensorboard")
               if runtime.tensorboard and not runtime.studies else None,
               max_pixels=data.max_pixels, failed_backbones=failed)


def _first_buildable(model: ModelConfig, task: Task, seed: int):
    """(classifier, model config, failures): the classifier of ``model.backbone``; when
    backbones are compared, of the first candidate that builds, each one that does not
    (a file that is not an image network, a size it cannot take, ...) logged in one
    line and returned as (choice, size, why) for the comparison's table."""
    failed = [(networks.BackboneChoice(name), 0, why) for name, why in model.compare_failed]
    for name, why in model.compare_failed:
        logging.warning("Backbone %s not tried: %s", name, why)
    for choice in model.compare or (model.backbone,):
        size, why = model.size_for(choice) if model.compare else (model.image_size,
                                                                   model.image_size_reason)
        try:
            classifier = backbone.build_classifier(
                model.weights if not choice.is_file else "imagenet", model.include_top
                and choice.keeps_imagenet_top, size, seed, dropout=model.dropout,
                units=task.units, activation=task.activation, backbone=choice)
        except UserError as err:
            if not model.compare:
                raise
            reason = " ".join(str(err).split())
            logging.warning("Backbone %s at %d px not tried: %s", choice.label, size, reason)
            failed.append((choice, size, reason))
            continue
        return classifier, dataclasses.replace(
            model, backbone=choice, image_size=size, image_size_reason=why,
            include_top=model.include_top and choice.keeps_imagenet_top), failed
    raise ConfigError("No backbone of --backbones could be built:\n" + "\n".join(
        f"  {c.label}: {why}" for c, _, why in failed))


def cache_spec(job: Job, cache: CacheConfig, augment: str = "none",
               layers=None) -> cache_lib.CacheSpec:
    """The cache of this run's plain features, or of views drawn with ``augment``; of
    ``layers`` only when named (default: `cache.cached_layers`, what every run caches)."""
    return cache_lib.CacheSpec(
        weights_id=backbone_weights_id(job.model, job.seed),
        include_top=job.model.include_top, image_size=job.model.image_size,
        dtype=cache.dtype, data_dir=job.dataset.data_dir,
        precision=job.classifier.computes_in, augment=augment, net=job.classifier.net,
        layers=tuple(layers or ()))


def backbone_weights_id(model: ModelConfig, seed: int) -> str:
    """What the backbone's weights are, for provenance: a file backbone's are in the
    file ("in-file"; the file's hash is in the backbone's identity)."""
    if model.backbone.is_file:
        return "in-file"
    return weights_identity(model.weights, seed)


# The memory cached features may take before a stage streams them from the HDF5 file
# instead (``--heads_memory_gb`` raises it): a fixed, modest figure, never a share of the
# machine, so that a laptop with a browser open holds the run.
DEFAULT_MEMORY_GB = 1.0


def memory_budget(cache: CacheConfig) -> float:
    """Bytes the cached features of a stage may take in memory (``--heads_memory_gb``,
    default `DEFAULT_MEMORY_GB`)."""
    return (DEFAULT_MEMORY_GB if cache.memory_gb is None else cache.memory_gb) * (1 << 30)


def fit_settings(job: Job, heads: HeadsConfig, cache: CacheConfig,
                 runtime: RuntimeConfig) -> FitSettings:
    """How this run's heads train on cached features (scenarios, CV folds, sweep, refit)."""
    return FitSettings(heads.epochs, runtime.batch_size, job.seed, job.class_weight,
                       heads.label_smoothing, patience=heads.patience,
                       scratch_dir=job.run.file("heads"))


def finetune_settings(job: Job, config: FinetuneConfig, heads: HeadsConfig,
                      runtime: RuntimeConfig, optimizer: str) -> FinetuneSettings:
    """How this run's fine-tuning (and its refit) trains, from the flags."""
    return FinetuneSettings(
        epochs=config.epochs, image_size=job.model.image_size, batch_size=runtime.batch_size,
        learning_rate=config.learning_rate, augment=config.augment,
        augment_on=config.augment_on, optimizer=optimizer, patience=config.patience,
        monitor=config.monitor, seed=job.seed, class_weight=job.class_weight,
        label_smoothing=heads.label_smoothing, resume=config.resume,
        tensorboard_dir=job.board, warmup_epochs=config.warmup)


class Features:
    """The cached features of one run: the split's plain features and, on demand, K
    augmented views of the training images (extracting whatever is missing)."""

    def __init__(self, job: Job, cache: CacheConfig, batch_size: int):
        self.job, self.cache, self.batch_size = job, cache, batch_size

    def _stream(self, views: int, layers=None) -> bool:
        """Whether the features (of ``layers``, default every cached layer) exceed the
        memory budget (logged either way)."""
        shapes = cache_lib.layer_shapes(self.job.classifier,
                                        layers or cache_spec(self.job, self.cache).layers)
        rows = len(self.job.train) * (1 + max(views, 0)) + len(self.job.val)
        need, budget = cache_lib.feature_bytes(shapes, rows), memory_budget(self.cache)
        stream = need > budget
        # Said once per decision on the terminal; every later load only in train.log.
        key = (rows, tuple(shapes), stream)
        say = console.DETAIL.info if key in self.job.said else logging.info
        self.job.said.add(key)
        say("Cached features: %.2f GB for %d rows; memory budget %.2f GB (%s): %s.",
            need / (1 << 30), rows, budget / (1 << 30),
            "--heads_memory_gb" if self.cache.memory_gb is not None
            else f"the default {DEFAULT_MEMORY_GB:g} GB",
            "streaming batches from the HDF5 cache" if stream else "loading into memory")
        return stream

    def _load(self, spec, frame, views: int, stream: bool):
        """Features of ``frame``'s images, read once per run: a frame whose images were
        all read before (by this spec, as many views, streamed or not) gets those rows."""
        paths = frame.path.tolist()
        # In memory only: streamed rows are read from the file, which a later extraction
        # (new images) may rebuild.
        memo = self.job.loaded.setdefault(spec.file_name(), []) if not stream else None
        for index, feats in memo or ():
            if all(p in index for p in paths):
                rows = np.array([index[p] for p in paths], np.int64)
                return {layer: take(v, rows) for layer, v in feats.items()}
        how = cache_lib.Extraction(extract.extraction_batch(self.batch_size),
                                   engine=self.job.engine)
        feats, result = cache_lib.load(self.job.classifier, spec, frame, self.cache.cache_dir,
                                       how, views=views, stream=stream)
        if result.computed:
            logging.info("Feature cache %s: %d reused, %d computed in %.1f s.", result.path,
                         result.reused, result.computed, result.seconds)
        if memo is not None and views == 0:  # views: the training images', once per preset
            memo.append(({p: i for i, p in enumerate(paths)}, feats))
        return feats

    def of(self, frame: pd.DataFrame, views: int = 0, preset: str = "none", layers=None):
        """Features of any images of this run (K augmented views each with ``views``), of
        ``layers`` only when named (a cache of just those; default every cached layer)."""
        spec = cache_spec(self.job, self.cache, preset if views else "none", layers)
        return self._load(spec, frame, views, self._stream(views, layers))

    def split(self, views: int = 0, preset: str = "keras_blog"):
        """(train, val, views or None): features by layer; the views are K augmented
        views of the training images drawn with ``preset`` (view-major)."""
        stream = self._stream(views)
        spec = cache_spec(self.job, self.cache)
        everything = self._load(spec, pd.concat([self.job.train, self.job.val]), 0, stream)
        n = len(self.job.train)
        train = {k: take(v, np.arange(n)) for k, v in everything.items()}
        val = {k: take(v, np.arange(n, n + len(self.job.val))) for k, v in everything.items()}
        if views <= 0:
            return train, val, None
        aug = self._load(cache_spec(self.job, self.cache, preset), self.job.train, views, stream)
        logging.info("Cached %d augmented view(s) (%s) of each training image.", views, preset)
        return train, val, aug


def check_disk(job: Job, cache: CacheConfig, views: int, view_preset: str,
               exports: int, views_of_every_layer: bool = True) -> None:
    """Stops before any long work when what the run will write cannot fit (one paragraph:
    what needs how much, where, how much is free, what to do).

    ``views``: the most augmented views per training image any stage will cache;
    ``exports``: how many copies of the model the run exports (0 without fine-tuning);
    ``views_of_every_layer``: False when only fine-tuning caches views, of the one layer
    its blocks train from (not known yet: the largest is planned).
    """
    spec = cache_spec(job, cache)
    needs = [("feature cache", cache_lib.planned_bytes(job.classifier, spec, job.frame,
                                                       cache.cache_dir), cache.cache_dir)]
    if views > 0:
        layers = None
        if not views_of_every_layer:
            shapes = cache_lib.layer_shapes(job.classifier, spec.layers)
            layers = (max(shapes, key=lambda name: int(np.prod(shapes[name]))),)
        needs.append((f"{views} augmented view(s) per training image", cache_lib.planned_bytes(
            job.classifier, cache_spec(job, cache, view_preset, layers), job.train,
            cache.cache_dir, views), cache.cache_dir))
    if exports:
        weights = job.classifier.model.count_params() * 4
        # best + last checkpoint + the next one being written + Adam's two slots
        needs.append(("fine-tuning checkpoints", 5 * weights, job.run.path))
        needs.append(("exported model(s)", weights * exports, job.run.path))
    diskspace.check(needs, advice="Use --cache_dir (or --workdir) on a bigger disk, "
                    "--cache_dtype=float16 (halves the cache), fewer cached views "
                    "(--finetune_views, --cache_augmented_views) or a smaller --image_size.")
