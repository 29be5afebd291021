"""Typed configuration: one frozen dataclass per concern, built once from the flags.

Library code never reads absl flags; each stage takes the parts it needs. Values
are parsed and checked here, before TensorFlow is imported, so a wrong flag
costs a fraction of a second instead of TensorFlow's start-up.
"""

import dataclasses
import os
from typing import Optional, Tuple, Union

from small_photo_classifier.features import networks, scenarios
from small_photo_classifier.pipeline import groups as groups_lib, limits
from small_photo_classifier.pipeline.errors import ConfigError
from small_photo_classifier.workflow.base import demo_settings
from small_photo_classifier.workflow.base import prior as prior_lib
# The parsers of single values live in `values`; imported here, where callers know them.
from small_photo_classifier.workflow.base.values import (FORMATS, _floats, check_rate, parse_folds,
                                                         parse_formats, parse_threshold, parse_tta,
                                                         parse_val_size)

AUGMENT_PRESETS = ("auto", "none", "keras_blog", "aggressive", "top_down")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_dir: Optional[str]
    positive_class: Optional[str]
    val_size: str
    seed: int
    on_bad_image: str
    demo: Optional[str] = None      # None, "binary" or "multiclass"
    label_column: Optional[str] = None
    task: Optional[str] = None      # None: detected from the data
    max_pixels: int = limits.MAX_PIXELS  # --max_pixels: a larger image is a bad image
    groups: Optional[str] = None         # --groups: a column of the labels CSV
    group_pattern: Optional[str] = None  # --group_pattern: from the file names
    near_duplicate_groups: bool = True   # --near_duplicate_groups (without the two above)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    weights: str
    include_top: bool
    image_size: int
    dropout: float
    backbone: networks.BackboneChoice
    # --stage=backbones or --backbone=auto: the backbones to compare (``backbone`` is
    # the first of them until the comparison chooses).
    compare: Tuple[networks.BackboneChoice, ...] = ()
    # Why ``image_size`` is what it is (logged): --image_size, @SIZE, the trained size.
    image_size_reason: str = "--image_size"
    image_size_asked: Optional[int] = None  # --image_size when given: every candidate's
    compare_failed: Tuple[Tuple[str, str], ...] = ()  # --backbones entries: (entry, why)

    def size_for(self, choice: networks.BackboneChoice) -> Tuple[int, str]:
        """(input size, why) of a backbone: its @SIZE, else --image_size when given,
        else the size it was trained at."""
        if choice.size or not self.image_size_asked:
            return choice.trained_size()
        return self.image_size_asked, "--image_size"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    cache_dir: str
    dtype: str
    augmented_views: int
    memory_gb: Optional[float]


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    scenarios: Tuple[str, ...]
    epochs: int
    learning_rate: Optional[float]
    optimizer: str
    cv_folds: str
    bag: bool
    label_smoothing: float = 0.0
    class_weight: str = "auto"      # auto, balanced or none
    refit: bool = True              # the exported model trains again on every label
    probe_baseline: bool = True     # the probe is kept unless a scenario beats it beyond noise
    patience: Optional[int] = None  # epochs without improvement before a head stops


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    scenarios: Tuple[str, ...]
    learning_rates: Tuple[float, ...]
    optimizers: Tuple[str, ...]
    dropouts: Tuple[float, ...]
    views: Tuple[int, ...]
    folds: int
    use: bool


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    scenario: Optional[str]
    trainable_blocks: Optional[str]
    augment: str
    augment_on: str
    learning_rate: float
    epochs: int
    views: int
    patience: int
    monitor: Optional[str]  # None: the task's headline metric
    resume: bool
    warmup: float = 1.0            # epochs of learning-rate warm-up (then a cosine decay)
    whole: str = "auto"            # --whole_network: auto, yes or no
    whole_epochs: int = 15
    whole_learning_rate: float = 1e-4
    whole_batch_size: int = 16
    whole_patience: int = 8

    @property
    def view_preset(self) -> str:
        """The preset cached augmented views are drawn with: identical views would be
        the plain features again, so no augmentation falls back to keras_blog, and so
        does ``auto`` until the fine-tuning resolves it (views of the heads stage, the
        sweep, the disk plan: every preset's views take the same room)."""
        return self.augment if self.augment not in ("none", "auto") else "keras_blog"


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    tta: Union[int, str]  # a number of views, or "auto" (chosen by evidence)
    bag: bool
    unfamiliar_rate: float = 0.05   # share of held-out known photos flagged unfamiliar
    threshold: Optional[str] = None  # --threshold, parsed (None: 0.5 binary, auto multi-label)
    prior: Optional[str] = None      # --prior: the field's class shares (checked form)


@dataclasses.dataclass(frozen=True)
class LabellingConfig:
    unlabelled_dir: Optional[str]
    budget: int
    strategy: str


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    formats: Tuple[str, ...] = ()
    quantize: str = "none"


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where and how the work runs: what train.py and predict.py both take."""
    batch_size: int
    precision: str
    strategy: str
    cpu_replicas: int
    ray_address: Optional[str]
    ray_workers: int

    @classmethod
    def from_values(cls, values: dict):
        """The dataclass from a mapping of flag names to values (extra names ignored)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


# Stages that study a trained run folder instead of training one.
LATER_STAGES = ("curve", "label_next")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(Devices):
    workdir: Optional[str] = None
    stage: str = "all"
    tensorboard: bool = True

    @property
    def heads(self) -> bool:
        return self.stage in ("heads", "all")

    @property
    def finetunes(self) -> bool:
        return self.stage in ("finetune", "all")

    @property
    def studies(self) -> bool:
        """A stage that studies a trained run (curve, label_next): it adds its own record
        and never rewrites what the training stages recorded."""
        return self.stage in LATER_STAGES

    @property
    def config_file(self) -> str:
        """The stage's settings file: run_config.json for the training stages,
        run_config_<stage>.json for a later one."""
        return f"run_config_{self.stage}.json" if self.studies else "run_config.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of one train.py run."""
    data: DataConfig
    model: ModelConfig
    cache: CacheConfig
    heads: HeadsConfig
    sweep: SweepConfig
    finetune: FinetuneConfig
    predict: PredictConfig
    runtime: RuntimeConfig
    labelling: LabellingConfig
    deploy: DeployConfig
    flag_values: dict  # every flag as given (after --demo's settings), for run_config.json
    given: Tuple[str, ...] = ()  # the flags passed on the command line (not defaults)

    @property
    def seed(self) -> int:
        return self.data.seed


def discover(data: DataConfig, cache: CacheConfig):
    """The labelled data as `pipeline.discovery.discover` finds it (no TensorFlow needed,
    so train.py runs it before TensorFlow starts), or with --demo the synthetic set, made
    on first use."""
    import logging
    from small_photo_classifier.pipeline import discovery
    data_dir = data.data_dir
    if data.demo and not data_dir:
        from small_photo_classifier.pipeline import demo
        folder = "demo_data" if data.demo == "binary" else f"demo_{data.demo}"
        data_dir = demo.make_demo_dataset(os.path.join(cache.cache_dir, folder), kind=data.demo)
        logging.info("SYNTHETIC demo data (not real photos) in %s", data_dir)
    return discovery.discover(data_dir, data.positive_class, data.label_column, data.task)


def _check(values: dict) -> None:
    """Checks that need no TensorFlow (everything else fails early in `prepare`)."""
    workdir = values.get("workdir")
    if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} is a file; expected a folder for the run's "
                          "outputs (a new one, or the folder of an earlier run).")
    for s in list(values["scenarios"]) + ([values["scenario"]] if values["scenario"] else []):
        scenarios.get_scenario(s)
    for name in [values["optimizer"], *values["sweep_optimizers"]]:
        scenarios.check_optimizer(name)
    choice = backbone_choice(values)
    if values["trainable_blocks"] and choice.described() is not None:
        scenarios.parse_blocks(values["trainable_blocks"], choice.described())  # others: built
    if values["augment"] not in AUGMENT_PRESETS:
        raise ConfigError(f"--augment={values['augment']!r} is not a preset; choose one of "
                          f"{', '.join(AUGMENT_PRESETS)}.")
    if not values["demo"] and not os.path.isdir(values["data_dir"]):
        raise ConfigError(f"Data folder {values['data_dir']!r} does not exist or is not a "
                          "folder.")
    if values["weights"] not in ("imagenet", "none") and not os.path.isfile(values["weights"]):
        raise ConfigError(f"--weights={values['weights']!r}: no such file. Expected "
                          "'imagenet', 'none', or the path of a weights file of the backbone "
                          "(VGG16: .h5 / .weights.h5).")
    if compare_choices(values) and values.get("ray_address"):
        raise ConfigError("--backbone=auto / --stage=backbones extract on this machine; run "
                          "them without --ray_address, then train with --backbone=<the choice> "
                          "on Ray.")
    if choice.is_file and values["weights"] != "imagenet" and not compare_choices(values):
        raise ConfigError(f"--backbone={choice.name} brings its own weights; drop "
                          f"--weights={values['weights']} (it applies to networks by name).")
    size = values["image_size"] or choice.trained_size()[0]
    if values["include_top"] and choice.keeps_imagenet_top and size != 224:
        raise ConfigError(f"--include_top keeps VGG16's fc1/fc2, which need 224x224 input; got "
                          f"an input of {size} px. Use --image_size=224 or --noinclude_top.")
    if values["image_size"] is not None and values["image_size"] < 32:
        raise ConfigError(f"--image_size must be at least 32 (the backbones here halve it "
                          f"five times); got {values['image_size']}.")
    parse_tta(values["tta"])
    parse_val_size(values["val_size"])
    parse_folds(values["cv_folds"])
    if not 0 <= values["label_smoothing"] < 1:
        raise ConfigError(f"--label_smoothing must be in [0, 1); got {values['label_smoothing']}.")
    if values["stage"] == "label_next":
        if not values["unlabelled_dir"]:
            raise ConfigError("--stage=label_next needs --unlabelled_dir=FOLDER (photos "
                              "without labels) and --budget=N.")
        if not os.path.isdir(values["unlabelled_dir"]):
            raise ConfigError(f"--unlabelled_dir={values['unlabelled_dir']!r} does not exist "
                              "or is not a folder.")
        if values["budget"] < 1:
            raise ConfigError(f"--budget must be at least 1; got {values['budget']}.")
    if values["batch_size"] < 1:
        raise ConfigError(f"--batch_size must be at least 1; got {values['batch_size']}.")


def backbone_choice(values: dict) -> networks.BackboneChoice:
    """``--backbone`` with ``--feature_layer``/``--stage_ends``, checked (no TensorFlow);
    with ``auto`` (or --stage=backbones) the first of ``--backbones`` that names one."""
    compared = compare_choices(values)
    if compared:
        return compared[0]
    return networks.check_choice(values.get("backbone") or "vgg16", values.get("feature_layer"),
                                 [s.strip() for s in values.get("stage_ends") or [] if s.strip()])


def compare_choices(values: dict) -> Tuple[networks.BackboneChoice, ...]:
    """``--backbones`` when --backbone=auto or --stage=backbones, else (): the entries
    that name a backbone (`networks.candidates`)."""
    return _compared(values)[0]


def _compared(values: dict) -> tuple:
    auto = str(values.get("backbone") or "").strip().lower() == "auto"
    if not auto and values.get("stage") != "backbones":
        return (), ()
    return networks.candidates([n.strip() for n in values.get("backbones") or []
                                if n.strip()])


def train_config(flag_values, names) -> TrainConfig:
    """Builds the configuration from parsed flags; ``--demo`` fills in its settings for
    every flag not passed (``names``: the flags of train.py)."""
    values = {name: flag_values[name].value for name in names}
    if values["demo"]:
        # Files bring their own weights; networks by name get the demo's random ones.
        only_files = all(c.is_file for c in compare_choices(values)
                         or (backbone_choice(values),))
        values.update({k: v for k, v in demo_settings.SETTINGS.items() if not flag_values[k].present
                       and not (k == "weights" and only_files)})
        values["workdir"] = values["workdir"] or os.path.join(
            "runs", "demo" if values["demo"] == "binary" else f"demo_{values['demo']}")
    elif not values["data_dir"]:
        raise ConfigError("Pass --data_dir=PATH (a Kaggle root or a folder of class folders), "
                          "or --demo to run on built-in synthetic data.")
    values["scenarios"] = [s.strip().upper() for s in values["scenarios"] if s.strip()]
    _check(values)
    v = values
    choice = backbone_choice(v)
    size, why = ((v["image_size"], "--image_size") if v["image_size"] and not choice.size
                 else choice.trained_size())
    return TrainConfig(
        data=DataConfig(v["data_dir"], v["positive_class"], v["val_size"], v["seed"],
                        v["on_bad_image"], v["demo"], v["label_column"],
                        None if v["task"] == "auto" else v["task"], v["max_pixels"],
                        v["groups"], groups_lib.check_pattern(v["group_pattern"]),
                        v["near_duplicate_groups"]),
        model=ModelConfig(v["weights"], v["include_top"] and choice.keeps_imagenet_top,
                          size, v["dropout"], choice, *_compared(v)[:1], why, v["image_size"],
                          _compared(v)[1]),
        cache=CacheConfig(v["cache_dir"], v["cache_dtype"], v["cache_augmented_views"],
                          v["heads_memory_gb"]),
        heads=HeadsConfig(tuple(v["scenarios"]), v["epochs"], v["learning_rate"],
                          v["optimizer"], str(v["cv_folds"]), v["bag"], v["label_smoothing"],
                          v["class_weight"], v["refit"], v["probe_baseline"],
                          v["heads_patience"] or None),
        sweep=SweepConfig(tuple(v["sweep_scenarios"]),
                          _floats(v["sweep_learning_rates"], "--sweep_learning_rates"),
                          tuple(o.strip().lower() for o in v["sweep_optimizers"]),
                          _floats(v["sweep_dropouts"], "--sweep_dropouts"),
                          tuple(int(x) for x in _floats(v["sweep_views"], "--sweep_views")),
                          v["sweep_folds"], v["use_sweep"]),
        finetune=FinetuneConfig(v["scenario"].upper() if v["scenario"] else None,
                                v["trainable_blocks"], v["augment"], v["augment_on"],
                                v["finetune_learning_rate"], v["finetune_epochs"],
                                v["finetune_views"], v["patience"],
                                None if v["monitor"] == "auto" else v["monitor"], v["resume"],
                                v["finetune_warmup"], v["whole_network"], v["whole_epochs"],
                                v["whole_learning_rate"], v["whole_batch_size"],
                                v["whole_patience"]),
        predict=PredictConfig(parse_tta(v["tta"]), v["bag"], check_rate(v["unfamiliar_rate"]),
                              parse_threshold(v["threshold"]),
                              prior_lib.check_text(v["prior"])),
        runtime=RuntimeConfig.from_values(v),
        labelling=LabellingConfig(v["unlabelled_dir"], v["budget"], v["label_next_strategy"]),
        deploy=DeployConfig(tuple(parse_formats(v["export"])), v["quantize"]),
        # --demo's settings count as given (its opening lines list them as the run's).
        flag_values=dict(values), given=tuple(n for n in names if flag_values[n].present or (
            values["demo"] and n in demo_settings.SETTINGS
            and values[n] == demo_settings.SETTINGS[n])))
