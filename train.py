"""Train a VGG16 transfer-learning classifier for a binary photo problem.

Stages (--stage):
  heads     extract frozen VGG16 features once into an HDF5 cache (--cache_dir),
            then train the dense-layer scenarios A, B, C on the cache in seconds,
            beside a linear-probe baseline;
  sweep     score a grid (scenario x learning rate x optimizer x dropout x cached
            augmented views) from the cache by stratified K-fold CV -> sweep.csv;
  finetune  fine-tune the chosen scenario's blocks end to end on augmented
            images, keep the best model, export model.keras (and bag.keras);
  all       (default) heads -> choose the best scenario -> finetune -> predict
            the test set if the data has one.

Quick start, offline, on built-in SYNTHETIC data:  python train.py --demo
Real data:  python train.py --data_dir=PATH [--weights=imagenet] [--workdir=runs/NAME]
"""

from pipeline import cli

cli.quiet_tensorflow()

import dataclasses  # noqa: E402
import logging as py_logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from typing import Mapping, Optional  # noqa: E402

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)

# Data
flags.DEFINE_string("data_dir", None, "Kaggle root (train/ + train_labels.csv) or a folder "
                    "of two class folders.")
flags.DEFINE_boolean("demo", False, "Generate the built-in SYNTHETIC demo dataset under "
                     "<cache_dir>/demo_data and run the whole pipeline on it offline "
                     "(random weights, 64 px, few epochs). Flags you pass still win.")
flags.DEFINE_string("positive_class", None, "Class-folder layout: which class folder is "
                    "positive (label 1). Default: the second in sorted order.")
flags.DEFINE_string("val_size", "auto", "Validation set: a count (balanced between classes "
                    "when they allow), a fraction such as 0.2, or 'auto': 200 (100/100, as in "
                    "the reference) when there are at least 1,000 images, else 20%.")
flags.DEFINE_integer("seed", 0, "Seed for the split, initialisation, shuffling, augmentation.")
flags.DEFINE_enum("on_bad_image", "fail", ["fail", "skip"], "An image that cannot be decoded: "
                  "stop with a list of them (fail) or leave them out and write "
                  "bad_images.csv (skip).")
# Outputs
flags.DEFINE_string("workdir", None, "Run folder for histories, plots, metrics, weights and "
                    "the model. Default: runs/<data folder name> (runs/demo for --demo).")
flags.DEFINE_string("cache_dir", "cache", "Folder of HDF5 feature caches (shareable).")
flags.DEFINE_boolean("tensorboard", True, "Write TensorBoard logs of every heads scenario and of "
                     "the fine-tuning under <workdir>/tensorboard/.")
# Model
flags.DEFINE_string("weights", "imagenet", "'imagenet' (Keras download, cached in "
                    "~/.keras/models), 'none' (random init), or a VGG16 .h5/.weights.h5 path.")
flags.DEFINE_boolean("include_top", True, "Keep VGG16's ImageNet dense layers fc1/fc2 and "
                     "replace only the 1000-way layer (needs --image_size=224). With "
                     "--noinclude_top the head is a new 256-unit fc1 + dropout.")
flags.DEFINE_integer("image_size", 224, "Square input size in pixels.")
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
                  "Compute precision of extraction, heads, fine-tuning and prediction. auto: "
                  "mixed_bfloat16 on CPUs with AVX512-BF16/AMX and GPUs of compute capability "
                  ">= 8.0, mixed_float16 on older GPUs, float32 otherwise (logged). The output "
                  "layer stays float32; cached features are stored as --cache_dtype says.")
flags.DEFINE_enum("strategy", "auto", ["auto", "one", "mirrored"], "Devices of this host: "
                  "mirrored = one model replica per device, each batch split between them "
                  "(tf.distribute.MirroredStrategy); auto = mirrored over 2+ GPUs (or "
                  "--cpu_replicas), else one device. The global batch stays --batch_size.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into N logical devices (N >= 2) so "
                     "that mirrored runs work without GPUs: for tests, not for speed.")
flags.DEFINE_string("ray_address", None, "Extract features on a Ray cluster (Ray Data, "
                    "pip install -e \".[ray]\"): 'local' starts one on this machine with "
                    "--ray_workers CPUs, 'auto' joins the cluster of `ray start`, or HOST:PORT. "
                    "Unset: no Ray.")
flags.DEFINE_integer("ray_workers", 2, "Ray actor workers, each holding one model copy.")
flags.DEFINE_integer("batch_size", 32, "Batch size for extraction, training and validation.")
flags.DEFINE_float("dropout", 0.5, "Dropout rate after the new fc1 (--noinclude_top only).")
# Stage 1: heads on cached features
flags.DEFINE_enum("stage", "all", ["heads", "sweep", "finetune", "all"], "What to run (see "
                  "above).")
flags.DEFINE_list("scenarios", ["A", "B", "C"], "Scenarios for the heads stage: A = output "
                  "layer only, B = all dense layers, C = dense layers + block5.")
flags.DEFINE_integer("epochs", 5, "Epochs per scenario on cached features.")
flags.DEFINE_float("learning_rate", None, "Heads-stage learning rate for every scenario. "
                   "Default: each scenario's own (A 1e-3; B, C 1e-4; measured on real photos).")
flags.DEFINE_string("optimizer", "adam", "Heads-stage optimizer: adam, sgd (momentum 0.9, "
                    "Nesterov) or rmsprop.")
flags.DEFINE_enum("cache_dtype", "float32", ["float16", "float32"], "Storage type of cached "
                  "features. float16 halves the cache; it left scenarios A/B unchanged but "
                  "cost scenario C ~0.03 AUC in docs/benchmarks.md.")
flags.DEFINE_float("heads_memory_gb", None, "Memory budget for cached features in the heads, "
                   "sweep and cached fine-tuning stages. Above it they stream batches from the "
                   "HDF5 cache instead of loading it (same results, slower). Default: half of "
                   "the memory available when the run starts.")
flags.DEFINE_integer("cache_augmented_views", 0, "K > 0: also cache K augmented views of "
                     "each training image (--augment preset, keras_blog if none) and train "
                     "heads on them.")
flags.DEFINE_string("cv_folds", "auto", "Stratified K-fold cross-validation of every scenario "
                    "on the training split: K >= 2, 0 for none, or 'auto' (5 when the "
                    "validation set has fewer than 100 images). With CV, the epoch and the "
                    "scenario are chosen by mean CV AUC instead of the validation set.")
flags.DEFINE_boolean("bag", True, "With CV: also export bag.keras, the average of the K fold "
                     "heads of the chosen scenario and the final model; predict.py uses it.")
# Sweep
flags.DEFINE_list("sweep_scenarios", ["A", "B"], "Sweep: scenarios (C is affordable at small "
                  "image sizes only: it trains block5).")
flags.DEFINE_list("sweep_learning_rates", ["1e-3", "1e-4"], "Sweep: learning rates.")
flags.DEFINE_list("sweep_optimizers", ["adam", "sgd", "rmsprop"], "Sweep: optimizers.")
flags.DEFINE_list("sweep_dropouts", ["0.5"], "Sweep: dropout rates (--noinclude_top only).")
flags.DEFINE_list("sweep_views", ["0", "2"], "Sweep: cached augmented views per training "
                  "image (--augment preset).")
flags.DEFINE_integer("sweep_folds", 5, "Sweep: stratified CV folds on the training split.")
flags.DEFINE_boolean("use_sweep", False, "Heads and fine-tuning use the best row of "
                     "<workdir>/sweep.csv (scenario, learning rate, optimizer, dropout, views); "
                     "--stage=all runs the sweep first when there is none.")
# Stage 2: fine-tuning
flags.DEFINE_string("scenario", None, "Scenario to fine-tune (default: the heads stage's best, "
                    "by CV AUC when cross-validated, else validation AUC).")
flags.DEFINE_string("trainable_blocks", None, "Blocks to fine-tune instead of the scenario's, "
                    "e.g. block4,block5,fc (names: block1..block5, fc, predictions).")
flags.DEFINE_string("augment", "aggressive", "Augmentation preset for fine-tuning: none, "
                    "keras_blog, aggressive.")
flags.DEFINE_enum("augment_on", "auto", ["auto", "pipeline", "model"], "Where augmentation "
                  "runs: tf.data pipeline, or a layer in the model (the GPU when present).")
flags.DEFINE_float("finetune_learning_rate", 1e-4, "Adam learning rate for fine-tuning.")
flags.DEFINE_integer("finetune_epochs", 50, "Maximum fine-tuning epochs (0: export the "
                     "cache-trained model without fine-tuning).")
flags.DEFINE_integer("finetune_views", 5, "K > 0: when the fine-tuned blocks start above a "
                     "cached layer (A, B above block5_pool; C above block4_pool), cache K "
                     "augmented views (--augment preset) of each training image once and run "
                     "the fine-tuning epochs from the cache. 0: every epoch runs the whole "
                     "network on freshly augmented images. See the README for the measurement.")
flags.DEFINE_integer("patience", 5, "Early-stopping patience in epochs.")
flags.DEFINE_enum("monitor", "auc", ["auc", "accuracy", "loss"], "Validation metric for early "
                  "stopping and best-model selection.")
flags.DEFINE_boolean("resume", False, "Resume an interrupted fine-tuning from its last "
                     "checkpoint in --workdir.")
flags.DEFINE_integer("tta", 1, "Test-time augmentation views when predicting the test set.")

_OUR_FLAGS = sorted(set(FLAGS) - _ABSL_FLAGS)
# With 40 validation images the demo's AUC saturates near 1.0 in every epoch, so it
# selects the fine-tuning epoch by validation loss, which also keeps the 0.5 threshold
# (and so the printed accuracy) meaningful.
DEMO_SETTINGS = {"weights": "none", "include_top": False, "image_size": 64, "val_size": "40",
                 "epochs": 5, "finetune_epochs": 3, "batch_size": 16, "patience": 3,
                 "augment": "keras_blog", "monitor": "loss", "cv_folds": "3"}
# Below this many validation images, --cv_folds=auto cross-validates (see the flag).
SMALL_VAL = 100
AUTO_FOLDS = 5


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of one run, fixed once from the flags (library code never reads FLAGS)."""
    values: Mapping[str, object]

    def __post_init__(self):
        object.__setattr__(self, "values", types.MappingProxyType(dict(self.values)))

    def __getattr__(self, name):
        if name == "values":  # not yet set (e.g. while copying): no recursion
            raise AttributeError(name)
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def from_flags(cls, flag_values) -> "RunConfig":
        """Reads our flags; --demo fills in its settings for every flag not passed."""
        values = {name: flag_values[name].value for name in _OUR_FLAGS}
        if values["demo"]:
            from pipeline import demo
            values.update({k: v for k, v in DEMO_SETTINGS.items() if not flag_values[k].present})
            if values["data_dir"] is None:
                values["data_dir"] = demo.make_demo_dataset(
                    os.path.join(values["cache_dir"], "demo_data"))
                logging.info("SYNTHETIC demo data (not real photos) in %s", values["data_dir"])
            values["workdir"] = values["workdir"] or os.path.join("runs", "demo")
        values["scenarios"] = [s.strip().upper() for s in values["scenarios"] if s.strip()]
        return cls(values)


@dataclasses.dataclass
class Job:
    """What the stages share: data, split, model, where outputs go."""
    precision: object
    dataset: object
    frame: object
    train: object
    val: object
    classifier: object
    workdir: str
    folds: Optional[list]
    outputs: dict
    engine: object = None  # a features.ray_engine.RayEngine with --ray_address

    @property
    def metrics_path(self):
        return os.path.join(self.workdir, "metrics.json")

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)


def _resolve_val_size(text: str, n: int):
    from pipeline import discovery
    if text.strip().lower() != "auto":
        return discovery.parse_val_size(text)
    value = 200 if n >= 1000 else 0.2
    logging.info("--val_size=auto: %s of %d images (200 needs at least 1,000; pass "
                 "--val_size to choose).", "200" if value == 200 else "20%", n)
    return value


def _resolve_folds(cfg: RunConfig, train, val):
    """--cv_folds as index pairs into the training split, or None."""
    from features import heads
    text = str(cfg.cv_folds).strip().lower()
    if text == "auto":
        smallest = int(train.label.value_counts().min())
        if len(val) >= SMALL_VAL:
            return None
        if smallest < AUTO_FOLDS:
            logging.warning("Validation set is small (%d images) but a class has only %d "
                            "training images, too few for %d-fold CV: choosing by validation "
                            "AUC.", len(val), smallest, AUTO_FOLDS)
            return None
        logging.info("Validation set is small (%d < %d images): scenarios and epochs are "
                     "chosen by %d-fold CV on the training split (mean +- std), not by "
                     "validation AUC alone. --cv_folds=0 turns this off.", len(val), SMALL_VAL,
                     AUTO_FOLDS)
        k = AUTO_FOLDS
    else:
        try:
            k = int(text)
        except ValueError:
            from pipeline.errors import ConfigError
            raise ConfigError(f"--cv_folds must be an integer or 'auto'; got {cfg.cv_folds!r}.")
        if k == 0:
            return None
    return heads.make_folds(train.label.to_numpy(), k, cfg.seed)


def prepare(cfg: RunConfig) -> Job:
    """Discovers and checks the data, splits it, builds the classifier."""
    from features import backbone, distribute, heads, precision
    from pipeline import discovery, scan
    dataset = discovery.discover(cfg.data_dir, cfg.positive_class)
    workdir = cfg.workdir or os.path.join(
        "runs", os.path.basename(os.path.abspath(dataset.data_dir).rstrip(os.sep)))
    os.makedirs(workdir, exist_ok=True)
    cli.log_to_file(os.path.join(workdir, "train.log"))
    for s in cfg.scenarios + ([cfg.scenario] if cfg.scenario else []):
        backbone.get_scenario(s)  # validate before any long work
    backbone.make_optimizer(cfg.optimizer, 1e-3)
    if cfg.trainable_blocks:
        backbone.parse_blocks(cfg.trainable_blocks)
    # Pre-flight: every image checked once, problems reported together.
    frame = scan.filter_bad_images(dataset.frame, cfg.image_size, cfg.on_bad_image,
                                   os.path.join(workdir, "bad_images.csv"),
                                   memo_path=os.path.join(cfg.cache_dir, "preflight.json"))
    train, val = discovery.split_train_val(frame, _resolve_val_size(cfg.val_size, len(frame)),
                                           cfg.seed)
    split = frame.assign(subset=["val" if n in set(val.name) else "train" for n in frame.name])
    heads.write_csv(split[["name", "label", "subset", "path"]], os.path.join(workdir,
                                                                             "split.csv"))
    logging.info("Split: %d train, %d validation (seed %d) -> %s", len(train), len(val),
                 cfg.seed, os.path.join(workdir, "split.csv"))
    # Before the model is built: layers take the global policy when they are created.
    chosen = precision.resolve_and_apply(cfg.precision)
    heads.write_json(os.path.join(workdir, "run_config.json"),
                     {**cfg.values, "precision_resolved": dataclasses.asdict(chosen),
                      "precision_parts": precision.parts(chosen.policy),
                      "replicas": distribute.replicas()})
    classifier = backbone.build_classifier(cfg.weights, cfg.include_top, cfg.image_size,
                                           cfg.seed, dropout=cfg.dropout)
    classifier.model.summary(print_fn=lambda line, *a, **k: logging.info(line),
                             expand_nested=True)
    return Job(chosen, dataset, frame, train, val, classifier, workdir,
               _resolve_folds(cfg, train, val), {})


def _cache_spec(cfg: RunConfig, job: Job, augmented: bool = False):
    """The cache of this run's plain features, or (``augmented``) of its augmented views."""
    from features import backbone, cache as cache_lib
    return cache_lib.CacheSpec(
        weights_id=backbone.weights_identity(cfg.weights, cfg.seed),
        include_top=cfg.include_top, image_size=cfg.image_size,
        layers=cache_lib.cached_layers(cfg.include_top), dtype=cfg.cache_dtype,
        data_dir=job.dataset.data_dir, precision=job.precision.policy,
        augment=(cfg.augment if cfg.augment != "none" else "keras_blog") if augmented
        else "none")


def check_disk(cfg: RunConfig, job: Job) -> None:
    """Stops before any long work when what the run will write cannot fit (one paragraph:
    what needs how much, where, how much is free, what to do)."""
    from features import cache as cache_lib
    from pipeline import diskspace
    needs = [("feature cache", cache_lib.planned_bytes(job.classifier, _cache_spec(cfg, job),
                                                       job.frame, cfg.cache_dir), cfg.cache_dir)]
    views = max(cfg.cache_augmented_views,
                cfg.finetune_views if cfg.stage in ("finetune", "all") else 0)
    if views > 0 and cfg.augment != "none":
        needs.append((f"{views} augmented view(s) per training image", cache_lib.planned_bytes(
            job.classifier, _cache_spec(cfg, job, augmented=True), job.train, cfg.cache_dir,
            views), cfg.cache_dir))
    if cfg.stage in ("finetune", "all"):
        weights = job.classifier.model.count_params() * 4
        # best + last checkpoint + the next one being written + Adam's two slots
        needs.append(("fine-tuning checkpoints", 5 * weights, job.workdir))
        needs.append(("exported model(s)", weights * (2 if cfg.bag else 1), job.workdir))
    diskspace.check(needs, advice="Use --cache_dir (or --workdir) on a bigger disk, "
                    "--cache_dtype=float16 (halves the cache), fewer cached views "
                    "(--finetune_views, --cache_augmented_views) or a smaller --image_size.")


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else 4 GB)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _stream_features(cfg: RunConfig, job: Job, views: int) -> bool:
    """Whether the cached features of this run exceed the memory budget (logged either way)."""
    from features import cache as cache_lib
    spec = _cache_spec(cfg, job)
    shapes = cache_lib.layer_shapes(job.classifier, spec.layers)
    rows = len(job.train) * (1 + max(views, 0)) + len(job.val)
    need = cache_lib.feature_bytes(shapes, rows)
    budget = (cfg.heads_memory_gb * (1 << 30) if cfg.heads_memory_gb is not None
              else available_memory() // 2)
    stream = need > budget
    logging.info("Cached features for this stage: %.2f GB for %d rows; memory budget %.2f GB "
                 "(%s): %s.", need / (1 << 30), rows, budget / (1 << 30),
                 "--heads_memory_gb" if cfg.heads_memory_gb is not None
                 else "half the available memory",
                 "streaming batches from the HDF5 cache" if stream else "loading into memory")
    return stream


def load_cached(cfg: RunConfig, job: Job, views: int = 0):
    """Cached features of the split (extracting what is missing), and of K augmented views
    of the training images when ``views`` > 0: (train, val, views or None). Arrays, or
    `cache.H5Rows` read on demand when they exceed the memory budget."""
    from features import cache as cache_lib
    spec = _cache_spec(cfg, job)
    result = cache_lib.ensure_features(job.classifier, spec, job.frame, cfg.cache_dir,
                                       cfg.batch_size, engine=job.engine)
    logging.info("Feature cache %s: %d reused, %d computed in %.1f s.", result.path,
                 result.reused, result.computed, result.seconds)
    stream = _stream_features(cfg, job, views)
    train = cache_lib.load_features(result.path, spec, job.train, spec.layers, stream=stream)
    val = cache_lib.load_features(result.path, spec, job.val, spec.layers, stream=stream)
    if views <= 0:
        return train, val, None
    aug_spec = _cache_spec(cfg, job, augmented=True)
    aug = cache_lib.ensure_features(job.classifier, aug_spec, job.train, cfg.cache_dir,
                                    cfg.batch_size, views=views, engine=job.engine)
    logging.info("Cached %d augmented view(s) (%s) of each training image.", views,
                 aug_spec.augment)
    return train, val, cache_lib.load_features(aug.path, aug_spec, job.train, spec.layers,
                                               views=views, stream=stream)


def heads_stage(cfg: RunConfig, job: Job, chosen=None) -> str:
    """Probe + scenarios on the cache; returns the best scenario. ``chosen``: a sweep config."""
    import shutil
    from features import heads, probe
    from pipeline import progress
    shutil.rmtree(job.path("heads", "bag"), ignore_errors=True)  # never mix with an old bag
    progress.report("heads", "repeat the heads stage (it trains from the feature cache)")
    views = chosen.views if chosen else cfg.cache_augmented_views
    train, val, view_feats = load_cached(cfg, job, views)
    y_train, y_val = job.train.label.to_numpy(), job.val.label.to_numpy()
    baseline = probe.run(train, y_train, val, y_val, job.folds, cfg.seed)
    heads.update_metrics(job.metrics_path, "probe", baseline)
    configs = ([chosen] if chosen else
               [heads.HeadConfig.for_scenario(s, cfg.learning_rate, optimizer=cfg.optimizer,
                                              views=views) for s in cfg.scenarios])
    results = heads.train_scenarios(job.classifier, configs, train, y_train, val, y_val,
                                    epochs=cfg.epochs, batch_size=cfg.batch_size,
                                    seed=cfg.seed, folds=job.folds, views_feats=view_feats,
                                    out_dir=job.workdir, tensorboard_dir=_board(cfg, job))
    best = heads.best_result(results)
    _interpret(job, job.path("heads"), best.val_probs, f"heads scenario {best.scenario}")
    heads.update_metrics(job.metrics_path, "heads", {s: r.summary() for s, r in results.items()})
    if job.folds:
        heads.update_metrics(job.metrics_path, "cross_validation",
                             {s: r.cv for s, r in results.items()})
    heads.update_metrics(job.metrics_path, "heads_choice", {
        "scenario": best.scenario, "by": best.selected_by, "score": best.score})
    job.outputs["heads plot"] = heads.plot_comparison(
        {s: r.history for s, r in results.items()}, job.path("heads_comparison.png"),
        title="Scenarios on cached features (validation)",
        reference={"val_auc": (baseline["val_auc"], "linear probe")})
    if cfg.bag and job.folds:
        _save_bag_members(cfg, job, best, train, view_feats)
    print(heads.format_summary(results, baseline, best))
    progress.clear("heads")
    return best.scenario


def _save_bag_members(cfg, job, best, train, view_feats):
    """Trains and saves the chosen scenario's K fold heads (``heads/bag/``)."""
    from features import heads
    start = best.start_layer
    members = heads.fold_members(
        job.classifier, best.config, train[start], job.train.label.to_numpy(), job.folds,
        epochs=best.best_epoch, batch_size=cfg.batch_size, seed=cfg.seed,
        views_x=view_feats[start] if view_feats else None)
    heads.save_bag_members(job.classifier, best.scenario, members, job.path("heads", "bag"))
    logging.info("Bag: %d fold heads of scenario %s saved in %s.", len(members), best.scenario,
                 job.path("heads", "bag"))


def sweep_stage(cfg: RunConfig, job: Job):
    """Scores the sweep grid by CV on the training split; writes sweep.csv and sweep.png."""
    from features import heads, probe, sweep
    grid = sweep.build_grid(
        cfg.sweep_scenarios, sweep.parse_floats(cfg.sweep_learning_rates, "--sweep_learning_rates"),
        cfg.sweep_optimizers, sweep.parse_floats(cfg.sweep_dropouts, "--sweep_dropouts"),
        [int(v) for v in sweep.parse_floats(cfg.sweep_views, "--sweep_views")],
        heads.has_dropout(job.classifier))
    train, val, view_feats = load_cached(cfg, job, max(c.views for c in grid))
    y_train = job.train.label.to_numpy()
    folds = heads.make_folds(y_train, cfg.sweep_folds, cfg.seed)
    logging.info("Sweep: %d configurations x %d folds, %d epochs each.", len(grid), len(folds),
                 cfg.epochs)
    started = time.perf_counter()
    table = sweep.run(job.classifier, grid, train, y_train, folds, epochs=cfg.epochs,
                      batch_size=cfg.batch_size, seed=cfg.seed, views_feats=view_feats)
    baseline = probe.cross_validate(probe.pooled(train[probe.PROBE_LAYER]), y_train, folds,
                                    cfg.seed)
    sweep.write(table, job.path("sweep.csv"), job.path("sweep.png"), baseline["auc_mean"])
    heads.update_metrics(job.metrics_path, "sweep", {
        "configurations": len(table), "folds": len(folds),
        "seconds": round(time.perf_counter() - started, 1),
        "best": table.iloc[0].drop("rank").to_dict(),
        "probe_cv_auc_mean": baseline["auc_mean"], "probe_cv_auc_std": baseline["auc_std"]})
    job.outputs.update({"sweep table": job.path("sweep.csv"), "sweep plot": job.path("sweep.png")})
    print(f"Sweep: {len(table)} configurations, {len(folds)}-fold CV on {len(y_train)} training "
          f"images; linear probe CV AUC {baseline['auc_mean']:.4f} +- {baseline['auc_std']:.4f}"
          f"\n{sweep.format_top(table)}")
    return sweep.best_config(table)


def finetune_stage(cfg: RunConfig, job: Job, scenario: str, optimizer: str = "adam") -> None:
    """Fine-tunes ``scenario`` from its cache-trained head and exports the model (and bag)."""
    from features import backbone, heads, inference
    from features import cache as cache_lib
    from features import finetune as finetune_lib
    head_weights = job.path("heads", f"{scenario}.weights.h5")
    heads.load_scenario_weights(job.classifier, scenario, head_weights)
    blocks = (backbone.parse_blocks(cfg.trainable_blocks) if cfg.trainable_blocks
              else backbone.scenario_blocks(scenario))
    logging.info("Fine-tuning scenario %s (blocks %s) from %s.", scenario, ",".join(blocks),
                 head_weights)
    summary = {"scenario": scenario, "blocks": blocks}
    started = time.perf_counter()
    if cfg.finetune_epochs > 0:
        cached = _finetune_views(cfg, job, blocks)
        ft = finetune_lib.finetune(
            job.classifier, blocks, job.train, job.val, workdir=job.workdir,
            image_size=cfg.image_size, batch_size=cfg.batch_size, augment=cfg.augment,
            learning_rate=cfg.finetune_learning_rate, epochs=cfg.finetune_epochs,
            patience=cfg.patience, monitor=cfg.monitor, seed=cfg.seed, resume=cfg.resume,
            augment_on=cfg.augment_on, optimizer=optimizer, tensorboard_dir=_board(cfg, job),
            cached=cached)
        # The whole stage, view extraction included, so both ways compare honestly.
        ft["fit_seconds"] = ft.pop("seconds")
        ft["seconds"] = round(time.perf_counter() - started, 2)
        ft["views"] = cached.views if cached else 0
        history = ft.pop("history")
        heads.write_csv(history, job.path("history_finetune.csv"))
        job.outputs["fine-tuning plot"] = heads.plot_history(history,
                                                             job.path("finetune_history.png"))
        summary.update(ft)
    val_auc, val_acc, probs = _validate(cfg, job, job.classifier.model)
    _interpret(job, job.workdir, probs, "final model")
    summary.update({"val_auc": val_auc, "val_accuracy": val_acc})
    heads.update_metrics(job.metrics_path, "finetune", summary)
    info = {"image_size": cfg.image_size, "class_names": list(job.dataset.class_names),
            "positive_class": job.dataset.class_names[1], "scenario": scenario,
            "trainable_blocks": blocks, "include_top": cfg.include_top,
            "weights": backbone.weights_identity(cfg.weights, cfg.seed),
            "preprocessing": cache_lib.PREPROCESSING, "output": "P(positive class)",
            "val_auc": val_auc, "val_accuracy": val_acc, "layout": job.dataset.layout,
            "trained_precision": job.precision.policy}
    bag = _export_bag(cfg, job, scenario, blocks, (val_auc, val_acc))
    if bag:
        info["bag"] = bag
    job.outputs["model"] = inference.export_model(job.classifier.model, job.workdir, info)
    probe_auc = heads.read_metrics(job.metrics_path).get("probe", {}).get("val_auc")
    print(f"final model (scenario {scenario}): validation AUC {val_auc:.4f}, accuracy "
          f"{val_acc:.4f}" + (f"; linear probe {probe_auc:.4f}" if probe_auc is not None else "")
          + (f"; bag of {bag['members']} {bag['val_auc']:.4f}" if bag else ""))


def _finetune_views(cfg, job, blocks):
    """`finetune.CachedViews` for --finetune_views=K when the blocks start above a cached
    layer (extracting the views once), else None: the whole network trains from images."""
    import numpy as np
    from features import backbone, cache as cache_lib
    from features import finetune as finetune_lib
    start = backbone.start_layer(blocks, job.classifier.include_top)
    if cfg.finetune_views <= 0:
        return None
    if start not in cache_lib.cached_layers(cfg.include_top):
        logging.info("Fine-tuning blocks %s reach below every cached layer: training the whole "
                     "network from images (--finetune_views applies above a cached layer).",
                     ",".join(blocks))
        return None
    if cfg.augment == "none":  # K identical views would be the plain features K times
        train, val, _ = load_cached(cfg, job)
        views, train_x = 1, train[start]
    else:
        train, val, aug = load_cached(cfg, job, cfg.finetune_views)
        views, train_x = cfg.finetune_views, aug[start]
    labels = job.train.label.to_numpy()
    return finetune_lib.CachedViews(start, train_x, np.tile(labels, views), val[start],
                                    job.val.label.to_numpy(), views)


def _validate(cfg, job, model):
    """(AUC, accuracy, probabilities) of ``model`` on the validation images."""
    from features import heads, inference
    probs = inference.predict_paths(model, job.val.path.tolist(), job.val.name.tolist(),
                                    cfg.image_size, cfg.batch_size, progress=False)
    return (*heads.binary_scores(job.val.label.to_numpy(), probs), probs)


def _board(cfg, job):
    """Where TensorBoard logs go (None with --notensorboard)."""
    if not cfg.tensorboard:
        return None
    job.outputs["tensorboard"] = job.path("tensorboard")
    return job.path("tensorboard")


def _interpret(job, folder, probs, what):
    """confusion_matrix.png, roc.png, top_losses.png of ``probs`` on the validation set."""
    from features import interpret
    interpret.write_all(folder, job.val.path.tolist(), job.val.label.to_numpy(), probs,
                        job.dataset.class_names)
    job.outputs[f"{what} plots"] = os.path.join(folder, "{" + ",".join(interpret.FILES) + "}")


def _export_bag(cfg, job, scenario, blocks, single) -> Optional[dict]:
    """bag.keras = the fold heads saved by the heads stage + the final model, when valid."""
    from features import backbone, heads, inference
    folder = job.path("heads", "bag")
    stale = os.path.join(job.workdir, inference.BAG_FILE)
    members = heads.load_bag_members(job.classifier, scenario, folder) if cfg.bag else []
    start = backbone.start_layer(backbone.scenario_blocks(scenario), job.classifier.include_top)
    # Fold heads sit on the frozen layers below `start`; --trainable_blocks reaching
    # deeper changes those layers under them, so such a run gets no bag.
    if not members or backbone.start_layer(blocks, job.classifier.include_top) != start:
        if os.path.exists(stale):
            os.remove(stale)  # never leave a bag from another run beside this model
        return None
    bag = inference.build_bag(job.classifier, scenario, members)
    auc, acc, _ = _validate(cfg, job, bag)
    inference.export_bag(bag, job.workdir)
    job.outputs["bag"] = stale
    logging.info("Bag of %d fold heads + the final model: val AUC %.4f (single model %.4f).",
                 len(members), auc, single[0])
    result = {"members": len(members) + 1, "val_auc": auc, "val_accuracy": acc,
              "single_model_val_auc": single[0], "file": inference.BAG_FILE}
    heads.update_metrics(job.metrics_path, "bag", result)
    return result


def predict_test(cfg: RunConfig, job: Job) -> None:
    """Predicts the Kaggle test/ folder into submission.csv (with the bag when there is one)."""
    from features import inference
    from pipeline import discovery, scan
    test = discovery.discover_unlabelled(job.dataset.data_dir)
    test = scan.filter_bad_images(test, cfg.image_size, "skip",
                                  job.path("bad_test_images.csv"), keep_rows=True)
    model = job.classifier.model
    if "bag" in job.outputs:
        model, _ = inference.load_exported(job.workdir, bag=True, policy=job.precision.policy)
    probs = inference.predict_frame(model, test, cfg.image_size, cfg.batch_size, cfg.tta)
    job.outputs["submission"] = inference.write_predictions(test.name, probs,
                                                            job.path("submission.csv"))
    hidden = os.path.join(job.dataset.data_dir, "test_labels.csv")
    if cfg.demo and os.path.isfile(hidden):
        scores = inference.score_against_labels(test.name.tolist(), probs, hidden)
        print(f"demo test set (synthetic): AUC {scores['auc']:.4f}, accuracy "
              f"{scores['accuracy']:.4f}")


def run(cfg: RunConfig) -> Job:
    """The whole training job, under the chosen tf.distribute strategy."""
    from features import distribute
    engine = None
    if cfg.ray_address:
        from features import ray_engine
        engine = ray_engine.RayEngine(cfg.ray_address, cfg.ray_workers, build={
            "weights": cfg.weights, "include_top": cfg.include_top,
            "image_size": cfg.image_size, "seed": cfg.seed})
    try:
        with distribute.scope(distribute.make_strategy(cfg.strategy, cfg.cpu_replicas)):
            return _run_stages(cfg, engine)
    finally:
        if engine is not None:
            engine.stop()


def _run_stages(cfg: RunConfig, engine=None) -> Job:
    """The stages, in the order they run."""
    from features import heads, sweep
    started = time.perf_counter()
    job = prepare(cfg)
    check_disk(cfg, job)
    if engine is not None:
        engine.precision = job.precision.policy
        job.engine = engine.start()
    chosen = None
    if cfg.stage == "sweep" or (cfg.use_sweep and cfg.stage == "all"
                                and not os.path.isfile(job.path("sweep.csv"))):
        chosen = sweep_stage(cfg, job)
    elif cfg.use_sweep:
        chosen = sweep.best_config(sweep.read_table(job.path("sweep.csv")))
    if chosen is not None and cfg.use_sweep:
        logging.info("Using the sweep's best configuration: %s.", chosen.describe())
        heads.set_dropout(job.classifier, chosen.dropout)
        chosen = dataclasses.replace(chosen, dropout=None)
    scenario = None
    if cfg.stage in ("heads", "all"):
        scenario = heads_stage(cfg, job, chosen if cfg.use_sweep else None)
    if cfg.stage in ("finetune", "all"):
        scenario = (cfg.scenario.upper() if cfg.scenario else
                    chosen.scenario if cfg.use_sweep and chosen else
                    scenario or heads.chosen_scenario(job.metrics_path))
        finetune_stage(cfg, job, scenario)
        if cfg.stage == "all" and job.dataset.test_dir:
            predict_test(cfg, job)
    _print_outputs(job, started)
    return job


def _print_outputs(job: Job, started: float) -> None:
    job.outputs["metrics"] = job.metrics_path
    job.outputs["log"] = job.path("train.log")
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Outputs in {job.workdir}:")
    for what, path in job.outputs.items():
        print(f"  {what:18s} {path}")
    if "model" in job.outputs:
        print(f"Next: python predict.py --workdir={job.workdir} --data_dir=FOLDER "
              f"--output=submission.csv")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    py_logging.getLogger().setLevel(py_logging.INFO)
    with cli.user_errors():
        if FLAGS.cpu_replicas > 1:  # before anything starts TensorFlow's devices
            from features import distribute
            distribute.split_cpu(FLAGS.cpu_replicas)
        if not FLAGS.demo and not FLAGS.data_dir:
            from pipeline.errors import ConfigError
            raise ConfigError("Pass --data_dir=PATH (a Kaggle root or a folder of two class "
                              "folders), or --demo to run on built-in synthetic data.")
        run(RunConfig.from_flags(FLAGS))


if __name__ == "__main__":
    app.run(main)
