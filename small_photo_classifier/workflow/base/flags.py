"""Every command-line flag of train.py and predict.py, declared once, grouped by stage.

absl groups ``--help`` by the module a flag is declared for; here that "module"
is a stage name, so ``python train.py --help`` reads as a list of sections.
Flags both scripts take (precision, devices, Ray, batch size, bad images, TTA)
are declared by one function. Nothing here imports TensorFlow: the scripts parse
and check flags before the first slow import.
"""

from absl import flags

from small_photo_classifier.features.scenarios import SCENARIO_HELP
from small_photo_classifier.pipeline import limits

PRECISIONS = ["auto", "float32", "mixed_bfloat16", "mixed_float16"]
STRATEGIES = ["auto", "one", "mirrored"]
DATA, OUTPUTS, MODEL, HEADS, SWEEP, FINETUNE, WHOLE, PREDICT, DEVICES, TESTING, LABELLING, \
    DEPLOY = ("data", "outputs", "model", "heads stage (cached features)", "sweep stage",
              "fine-tuning stage", "whole-network fine-tuning", "prediction",
              "precision, devices and scale-out", "testing (not for everyday use)",
              "labelling: what to label next", "deployment exports")
ALIASES = "aliases (clearer names of flags above)"


class _DemoParser(flags.ArgumentParser):
    """``--demo`` alone means the binary demo; ``--demo=multiclass`` the multi-class one."""

    def parse(self, argument):
        text = str(argument).strip().lower()
        if text in ("true", "1", "binary"):
            return "binary"
        if text in ("false", "0", "none", ""):
            return None
        if text == "multiclass":
            return "multiclass"
        raise ValueError(f"--demo takes binary or multiclass; got {argument!r}")

    def flag_type(self):
        return "demo"


def _shared(fv, tta_help: str) -> None:
    """The flags train.py and predict.py both take, with the same meaning."""
    flags.DEFINE_integer("batch_size", 32, "Images per batch for extraction, training, "
                         "validation and prediction.", flag_values=fv, module_name=DEVICES)
    flags.DEFINE_enum("on_bad_image", "fail", ["fail", "skip"], "An image that cannot be "
                      "decoded: stop with a list of them (fail), or leave it out with a report "
                      "(skip: never given a probability or a class; a prediction CSV leaves its "
                      "row out and <output>_bad_images.csv lists it with the reason).", flag_values=fv, module_name=DATA)
    flags.DEFINE_integer("max_pixels", limits.MAX_PIXELS, "An image with more pixels than "
                         "this (read from its header, before decoding) is a bad image, never "
                         "decoded: no camera photo is that large, a decompression bomb is.",
                         lower_bound=1, flag_values=fv, module_name=DATA)
    flags.DEFINE_string("tta", "auto", tta_help, flag_values=fv, module_name=PREDICT)
    flags.DEFINE_enum("precision", "auto", PRECISIONS, "Compute precision of the conv base. "
                      "auto: mixed_bfloat16 on CPUs with AVX512-BF16/AMX and GPUs of compute "
                      "capability >= 8.0, mixed_float16 on older GPUs, float32 otherwise "
                      "(logged). The dense head always computes in float32.",
                      flag_values=fv, module_name=DEVICES)
    flags.DEFINE_enum("strategy", "auto", STRATEGIES, "Devices of this host: mirrored = one "
                      "model replica per device, each batch split between them "
                      "(tf.distribute.MirroredStrategy); auto = mirrored over 2+ GPUs, else "
                      "one device. The global batch stays --batch_size.",
                      flag_values=fv, module_name=DEVICES)
    flags.DEFINE_string("ray_address", None, "Run extraction/prediction on a Ray cluster (Ray "
                        "Data, pip install -e \".[ray]\"): 'local' starts one on this machine "
                        "with --ray_workers CPUs, 'auto' joins the cluster of `ray start`, or "
                        "HOST:PORT. Unset: no Ray.", flag_values=fv, module_name=DEVICES)
    flags.DEFINE_integer("ray_workers", 2, "Ray actor workers, each holding one model copy.",
                         flag_values=fv, module_name=DEVICES)
    flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into N logical devices (N >= 2) so "
                         "that mirrored runs work without GPUs: for tests, not for speed.",
                         flag_values=fv, module_name=TESTING)


def define_export(fv=flags.FLAGS) -> None:
    """Deployment formats: train.py (at the end of the run) and export.py take these."""
    flags.DEFINE_string("export", "none", "Also export the final model for deployment, "
                        "comma-separated: savedmodel (TF Serving), onnx (onnxruntime; needs "
                        "pip install -e \".[export]\"), tflite (phones, small devices); each "
                        "checked against model.keras on the validation images. none: only "
                        "model.keras.", flag_values=fv, module_name=DEPLOY)
    flags.DEFINE_enum("quantize", "none", ["none", "fp16", "int8"], "With --export=tflite, also "
                      "a quantized TFLite file: fp16 (float16 weights, ~half the size) or int8 "
                      "(weights and activations, calibrated on the validation images).",
                      flag_values=fv, module_name=DEPLOY)


def define_train(fv=flags.FLAGS) -> None:
    """The flags of train.py, section by section."""
    for define in (_train_data, _train_groups, _train_model, _train_heads, _train_choice, _train_sweep,
                   _train_finetune, _train_whole):
        define(dict(flag_values=fv))
    define_export(fv)
    _train_trust(dict(flag_values=fv))
    # Clearer names for flags that are easy to confuse; the old names stay.
    for alias, original in (("heads_scenarios", "scenarios"), ("heads_epochs", "epochs"),
                            ("heads_views", "cache_augmented_views"),
                            ("finetune_scenario", "scenario")):
        flags.DEFINE_alias(alias, original, flag_values=fv, module_name=ALIASES)
    _shared(fv, "Test-time augmentation views of the exported model: auto = 2 (image and "
                "mirror) when they beat 1 on the validation images beyond noise, else 1; or a "
                "number (1 = plain; 2 adds the mirror; up to 8 adds crops).")


def _train_trust(d: dict) -> None:
    """What the exported model's probabilities and flags mean (fitted on held-out
    predictions at export)."""
    flags.DEFINE_float("unfamiliar_rate", 0.05, "Share of held-out photos of the known classes "
                       "that the unfamiliar threshold flags (it is fixed at training time on "
                       "them); photos unlike any training photo score far above it.",
                       module_name=PREDICT, **d)
    flags.DEFINE_string("threshold", None, "Decision threshold of binary and multi-label "
                        "outputs, on the calibrated probability, chosen on the held-out "
                        "predictions: a number such as 0.5, auto (best F1), precision:P "
                        "(the lowest threshold with precision >= P) or recall:R (the highest "
                        "with recall >= R). Default: 0.5 for binary, auto for multi-label. "
                        "Stored with the model; the report states the precision and recall "
                        "to expect at it.", module_name=PREDICT, **d)
    flags.DEFINE_string("prior", None, "The class shares of the photos the model will meet, "
                        "when they differ from the training labels' (e.g. 5% invasive in "
                        "the field, balanced training): CLASS:SHARE,... (two classes: one "
                        "share is enough, e.g. bees:0.2 or 0.2 for the positive class). The "
                        "calibrated probabilities are moved to them (Saerens et al. 2002) "
                        "everywhere, exports included, and the thresholds' precision and "
                        "recall are recomputed for them; model_info.json records both "
                        "shares.", module_name=PREDICT, **d)


def _train_data(d: dict) -> None:
    """Where the data and the outputs are."""
    flags.DEFINE_string("data_dir", None, "Kaggle root (train/ + train_labels.csv) or a folder "
                        "of class folders.", module_name=DATA, **d)
    flags.DEFINE_flag(flags.Flag(
        _DemoParser(), flags.ArgumentSerializer(), "demo", None,
        "--demo (or --demo=binary): generate the built-in SYNTHETIC two-class demo dataset "
        "under <cache_dir>/demo_data and run the whole pipeline on it offline (random "
        "weights, 64 px, few epochs); --demo=multiclass: four classes. Flags you pass "
        "still win.", boolean=True), flag_values=d["flag_values"], module_name=DATA)
    flags.DEFINE_enum("task", "auto", ["auto", "binary", "multiclass", "multilabel"],
                      "What is predicted: auto detects it from the data (two class folders or "
                      "a 0/1 column: binary; more classes: multiclass; space-separated tags "
                      "or several 0/1 columns: multilabel).", module_name=DATA, **d)
    flags.DEFINE_string("label_column", None, "Kaggle layout: the column of train_labels.csv "
                        "that holds the labels (default: invasive, else the only column "
                        "besides name, else every column when they are all 0/1).",
                        module_name=DATA, **d)
    flags.DEFINE_string("positive_class", None, "Two class folders: which one is positive "
                        "(label 1). Default: the second in sorted order.", module_name=DATA, **d)
    flags.DEFINE_string("val_size", "auto", "Validation set, each class in its share of the "
                        "data (what calibration, thresholds and the expected score are fitted "
                        "and measured on): a count, a fraction such as 0.2, or 'auto': 200 "
                        "when there are at least 1,000 images, else 20%. 100+100 (one term "
                        "per class): that many of each class, the reference write-up's "
                        "balanced split.", module_name=DATA, **d)
    flags.DEFINE_integer("seed", 0, "Seed for the split, initialisation, shuffling, "
                         "augmentation.", module_name=DATA, **d)
    flags.DEFINE_string("workdir", None, "Run folder for histories, plots, metrics, weights "
                        "and the model. Default: runs/<data folder name> (runs/demo for "
                        "--demo).", module_name=OUTPUTS, **d)
    flags.DEFINE_string("cache_dir", "cache", "Folder of HDF5 feature caches (shareable).",
                        module_name=OUTPUTS, **d)
    flags.DEFINE_boolean("tensorboard", True, "Write TensorBoard logs of every heads scenario "
                         "and of the fine-tuning under <workdir>/tensorboard/.",
                         module_name=OUTPUTS, **d)
    flags.DEFINE_enum("stage", "all", ["heads", "sweep", "finetune", "all", "curve",
                                       "label_next", "backbones"],
                      "What to run: backbones (compare --backbones: backbones.csv/.png), "
                      "heads (cache features, train the scenarios), sweep (grid "
                      "by CV), finetune (the chosen scenario end to end, then export), all; "
                      "curve (how the score grows with the labels: learning_curve.csv/.png), "
                      "label_next (which photos of --unlabelled_dir to label next).",
                      module_name=OUTPUTS, **d)
    flags.DEFINE_string("unlabelled_dir", None, "--stage=label_next: a folder of photos "
                        "without labels to choose from.", module_name=LABELLING, **d)
    flags.DEFINE_integer("budget", 20, "--stage=label_next: how many photos to choose.",
                         module_name=LABELLING, **d)
    flags.DEFINE_enum("label_next_strategy", "combined", ["combined", "uncertainty",
                                                           "diversity", "random"],
                      "--stage=label_next: combined = uncertain photos unlike the labelled "
                      "and already chosen ones (measured in docs/benchmarks.md); uncertainty; "
                      "diversity (k-center); random.", module_name=LABELLING, **d)


def _train_groups(d: dict) -> None:
    """Which photos belong together (one plant, camera or site)."""
    flags.DEFINE_string("groups", None, "A column of the labels CSV naming each photo's "
                        "group (a plant, a camera, a site): every split and fold - validation, "
                        "cross-validation, the bag, --stage=curve, --backbone=auto, the label "
                        "audit - keeps a group on one side.", module_name=DATA, **d)
    flags.DEFINE_string("group_pattern", None, "The groups from the file names: a regular "
                        "expression whose first capture group is the group, e.g. "
                        "'^(cam\\d+)_' or '^(.*)_\\d$' (copies named <photo>_<k>).",
                        module_name=DATA, **d)
    flags.DEFINE_boolean("near_duplicate_groups", True, "Without --groups or "
                         "--group_pattern: photos that are near-duplicates of each other "
                         "(the label audit's copies, mirrors, re-saves and crops; pretrained "
                         "weights only) are joined into groups, and the split and folds keep "
                         "each whole (said in the log).", module_name=DATA, **d)


def _train_model(d: dict) -> None:
    """The network."""
    flags.DEFINE_string("backbone", "vgg16", "The pretrained network under the new head: "
                        "vgg16 (the reference), auto (chosen by evidence among --backbones), "
                        "a keras.applications name (resnet50, "
                        "efficientnetb0, efficientnetv2b0, efficientnetv2s, convnext_tiny, "
                        "mobilenetv3large, mobilenetv3small; --weights applies), or a Keras "
                        "model file of any image network, PATH[@SIZE][:CONTRACT]: CONTRACT, "
                        "the input a file expects when its first layer does not scale it, is "
                        "rgb255, minus_one_to_one, zero_to_one, imagenet_mean_std or caffe "
                        "(README); such a file without one is refused.", module_name=MODEL,
                        **d)
    flags.DEFINE_list("backbones", ["vgg16", "efficientnetv2b0"], "--stage=backbones and "
                      "--backbone=auto: the backbones to compare (names and .keras files; "
                      "--weights applies to the named ones). Each is extracted (cached), "
                      "and the probe and scenario B are cross-validated on the same folds; "
                      "auto goes on with the cheapest unless a richer one wins beyond noise.",
                      module_name=MODEL, **d)
    flags.DEFINE_string("feature_layer", None, "--backbone=FILE or a named network: the "
                        "layer whose output is the feature map (default: the last layer with "
                        "a spatial output).", module_name=MODEL, **d)
    flags.DEFINE_list("stage_ends", [], "--backbone=FILE or a named network: the last layer "
                      "of each stage, in order (default: from the layer names, blockN_/convN_/"
                      "stageN, else where the resolution halves).", module_name=MODEL, **d)
    flags.DEFINE_string("weights", "imagenet", "'imagenet' (Keras download, cached in "
                        "~/.keras/models), 'none' (random init), or a weights file of the "
                        "backbone (VGG16: .h5/.weights.h5).", module_name=MODEL, **d)
    flags.DEFINE_boolean("include_top", True, "VGG16 only: keep its ImageNet dense layers "
                         "fc1/fc2 and replace only the 1000-way layer (needs --image_size=224). "
                         "With --noinclude_top, and for every other backbone, the head is a "
                         "new 256-unit fc1 + dropout.",
                         module_name=MODEL, **d)
    flags.DEFINE_integer("image_size", None, "Square input size in pixels. Default: the "
                         "size the backbone was trained at (224 for VGG16 and most named "
                         "networks, 384 for efficientnetv2s; a file's fixed input size, else "
                         "name it as --backbone=PATH.keras@SIZE, else 224); the log says which "
                         "and why. Given, it applies to every backbone without an @SIZE.",
                         module_name=MODEL, **d)
    flags.DEFINE_float("dropout", 0.5, "Dropout rate after the new fc1 (--noinclude_top "
                       "only).", module_name=MODEL, **d)


def _train_heads(d: dict) -> None:
    """The heads stage on cached features."""
    flags.DEFINE_list("scenarios", ["A", "B", "C"], "Scenarios the heads stage trains and "
                      "compares (not --scenario, the one fine-tuned afterwards; alias "
                      "--heads_scenarios): " + SCENARIO_HELP + ".", module_name=HEADS, **d)
    flags.DEFINE_integer("epochs", 100, "The most epochs a scenario trains on cached "
                         "features (the heads stage; alias --heads_epochs): it stops earlier, "
                         "when its cross-validation (or validation) score has not improved for "
                         "--heads_patience epochs, and the epoch is chosen by that score. A "
                         "chosen epoch that is the last allowed is said ('still improving "
                         "at the last epoch: raise --epochs'). Fine-tuning has "
                         "--finetune_epochs.", lower_bound=1, module_name=HEADS, **d)
    flags.DEFINE_integer("heads_patience", 10, "Heads stage: epochs without a better "
                         "cross-validation (or validation) score before a scenario stops; 0 "
                         "trains every one of --epochs.", lower_bound=0, module_name=HEADS,
                         **d)
    flags.DEFINE_float("learning_rate", None, "Heads-stage learning rate for every scenario. "
                       "Default: each scenario's own, measured on real photos: a head that "
                       "pools the feature map (every backbone but VGG16) 1e-3; VGG16's "
                       "flattening head A 1e-3, B and C 1e-4.", module_name=HEADS, **d)
    flags.DEFINE_string("optimizer", "adam", "Heads-stage optimizer: adam, sgd (momentum 0.9, "
                        "Nesterov) or rmsprop.", module_name=HEADS, **d)
    flags.DEFINE_enum("cache_dtype", "float32", ["float16", "float32"], "Storage type of "
                      "cached features. float16 halves the cache; it left scenarios A/B "
                      "unchanged but cost scenario C ~0.03 AUC in docs/benchmarks.md.",
                      module_name=HEADS, **d)
    flags.DEFINE_float("heads_memory_gb", None, "Memory budget for cached features in the "
                       "heads, sweep and cached fine-tuning stages. Above it they stream "
                       "batches from the HDF5 cache instead of loading it (same results, "
                       "slower). Default: 1 GB, whatever the machine has (raise it to load "
                       "more into memory).",
                       module_name=HEADS, **d)
    flags.DEFINE_integer("cache_augmented_views", 0, "Heads stage: K > 0 also caches K augmented "
                         "views of each training image (--augment preset, keras_blog if none) "
                         "and trains the heads on them (alias --heads_views; the sweep has "
                         "--sweep_views, fine-tuning --finetune_views).", module_name=HEADS, **d)
    flags.DEFINE_string("cv_folds", "auto", "Stratified K-fold cross-validation of every "
                        "scenario on the training split: K >= 2, 0 for none, or 'auto' (5 when "
                        "the validation set has fewer than 100 images). With CV, the epoch and "
                        "the scenario are chosen by the mean CV score.", module_name=HEADS, **d)
    flags.DEFINE_enum("class_weight", "auto", ["auto", "balanced", "none"], "Weigh classes in "
                      "the loss of the heads, CV, sweep, probe and fine-tuning: balanced = each "
                      "class the same total weight; auto = balanced when the smallest class has "
                      "under 30% of the images.", module_name=HEADS, **d)
def _train_choice(d: dict) -> None:
    """What the heads stage exports: the probe or a scenario, the bag, the refit."""
    flags.DEFINE_boolean("probe_baseline", True, "With CV: the linear probe (the simpler model) "
                         "is the baseline: the best scenario is fine-tuned and exported only "
                         "when its out-of-fold predictions beat the probe's beyond a paired "
                         "bootstrap's noise, else the probe is exported. --noprobe_baseline: "
                         "the best scenario is kept unless the probe beats it beyond noise.",
                         module_name=HEADS, **d)
    flags.DEFINE_boolean("bag", True, "With CV: also export bag.keras, the average of the K "
                         "fold heads of the chosen scenario and the final model; it is the "
                         "default output only when it beats the single model on the validation "
                         "images beyond noise.", module_name=HEADS, **d)
    flags.DEFINE_boolean("refit", True, "Train the exported model again on every label "
                         "(training + validation images) with the settings and epoch counts "
                         "chosen before, whether cross-validation or a validation split chose "
                         "them. Its expected score stays the one measured before the refit, on "
                         "photos that neither trained that model nor chose its epoch "
                         "(--norefit: export the model trained on the training split).",
                         module_name=HEADS, **d)


def _train_sweep(d: dict) -> None:
    """The sweep stage."""
    flags.DEFINE_list("sweep_scenarios", ["A", "B"], "Sweep: scenarios (C is affordable at "
                      "small image sizes only: it trains the backbone's last stage).", module_name=SWEEP, **d)
    flags.DEFINE_list("sweep_learning_rates", ["1e-3", "1e-4"], "Sweep: learning rates.",
                      module_name=SWEEP, **d)
    flags.DEFINE_list("sweep_optimizers", ["adam", "sgd", "rmsprop"], "Sweep: optimizers.",
                      module_name=SWEEP, **d)
    flags.DEFINE_list("sweep_dropouts", ["0.5"], "Sweep: dropout rates (--noinclude_top "
                      "only).", module_name=SWEEP, **d)
    flags.DEFINE_list("sweep_views", ["0", "2"], "Sweep: cached augmented views per training "
                      "image (--augment preset).", module_name=SWEEP, **d)
    flags.DEFINE_integer("sweep_folds", 5, "Sweep: stratified CV folds on the training split.",
                         module_name=SWEEP, **d)
    flags.DEFINE_boolean("use_sweep", False, "Heads and fine-tuning use the best row of "
                         "<workdir>/sweep.csv (scenario, learning rate, optimizer, dropout, "
                         "views); --stage=all runs the sweep first when there is none.",
                         module_name=SWEEP, **d)


def _train_finetune(d: dict) -> None:
    """The fine-tuning stage."""
    flags.DEFINE_string("scenario", None, "The one scenario to fine-tune (default: the heads "
                        "stage's best of --scenarios, by CV score when cross-validated, else "
                        "validation; alias --finetune_scenario).",
                        module_name=FINETUNE, **d)
    flags.DEFINE_string("trainable_blocks", None, "Blocks to fine-tune instead of the "
                        "scenario's: the backbone's stage names (the log lists them; VGG16: "
                        "block1..block5), 'last' (its last stage), fc, predictions; e.g. "
                        "block4,block5,fc.", module_name=FINETUNE, **d)
    flags.DEFINE_string("augment", "auto", "Augmentation preset for fine-tuning: none, "
                        "keras_blog (upright photos: turns up to 40 degrees, mirror), "
                        "aggressive (also upside down, colour changes, 35% zoom), top_down "
                        "(photos from above: any quarter turn, both mirrors, mild crops), or "
                        "auto: the one whose views most help the linear probe on plain photos "
                        "(one cached view per photo of each; said and recorded).",
                        module_name=FINETUNE, **d)
    flags.DEFINE_enum("augment_on", "auto", ["auto", "pipeline", "model"], "Where "
                      "augmentation runs: tf.data pipeline, or a layer in the model (the GPU "
                      "when present).", module_name=FINETUNE, **d)
    flags.DEFINE_float("finetune_learning_rate", 1e-4, "Learning rate for fine-tuning.",
                       module_name=FINETUNE, **d)
    flags.DEFINE_integer("finetune_epochs", 50, "Maximum fine-tuning epochs (the heads "
                         "stage has --epochs; 0: export the cache-trained model without "
                         "fine-tuning).", module_name=FINETUNE, **d)
    flags.DEFINE_integer("finetune_views", 5, "K > 0: when the fine-tuned blocks start above a "
                         "cached layer (A, B above the feature map; C above its last stage's "
                         "input: VGG16's block5_pool and block4_pool), cache K "
                         "augmented views (--augment preset) of each training image once and "
                         "run the fine-tuning epochs from the cache. 0: every epoch runs the "
                         "whole network on freshly augmented images.", module_name=FINETUNE,
                         **d)
    flags.DEFINE_integer("patience", 5, "Fine-tuning (and whole-network fine-tuning): "
                         "epochs without a better validation score before it stops.",
                         module_name=FINETUNE, **d)
    flags.DEFINE_float("finetune_warmup", 1.0, "Epochs over which fine-tuning's learning "
                       "rate rises from 0 (then a cosine decay to 0 at the last allowed "
                       "epoch); 0: a constant rate.", lower_bound=0.0, module_name=FINETUNE,
                       **d)
    flags.DEFINE_enum("monitor", "auto", ["auto", "auc", "accuracy", "loss", "map"],
                      "Validation metric for early stopping and the kept fine-tuning epoch. "
                      "auto: the task's headline metric (auc for two classes, accuracy for "
                      "several, mean average precision (map) for several labels per image).",
                      module_name=FINETUNE, **d)
    flags.DEFINE_boolean("resume", False, "Resume an interrupted fine-tuning from its last "
                         "checkpoint in --workdir.", module_name=FINETUNE, **d)
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the loss (heads and "
                       "fine-tuning), e.g. 0.1; 0 for none.", module_name=FINETUNE, **d)


def _train_whole(d: dict) -> None:
    """Whole-network fine-tuning, a candidate the run compares with the frozen-feature
    model (--patience, --augment and --monitor are fine-tuning's, shared)."""
    flags.DEFINE_enum("whole_network", "auto", ["auto", "yes", "no"], "Also fine-tune every "
                      "stage of the backbone (from a cache-trained head, at its own size, "
                      "batch-norm frozen) and export it only when it beats the frozen-feature "
                      "model beyond noise on honest validation predictions. auto: on light "
                      "backbones (at most 10 M parameters: EfficientNet-Lite, MobileNet, "
                      "EfficientNetV2-B0) unless the frozen model is already too good for "
                      "anything to beat it beyond noise on the validation photos.",
                      module_name=WHOLE, **d)
    flags.DEFINE_integer("whole_epochs", 15, "Whole-network fine-tuning: the most epochs "
                         "(the cosine decay ends there; it stops earlier after "
                         "--whole_patience epochs without a better validation score).",
                         lower_bound=1, module_name=WHOLE, **d)
    flags.DEFINE_integer("whole_patience", 8, "Whole-network fine-tuning: epochs without a "
                         "better validation score before it stops (longer than --patience: "
                         "its early epochs dip while the network adapts, and its learning "
                         "rate is still high there).", lower_bound=1, module_name=WHOLE,
                         **d)
    flags.DEFINE_float("whole_learning_rate", 1e-4, "Whole-network fine-tuning: Adam's peak "
                       "learning rate.", module_name=WHOLE, **d)
    flags.DEFINE_integer("whole_batch_size", 16, "Whole-network fine-tuning: images per "
                         "batch (at most --batch_size): every layer's activations are kept "
                         "for the backward pass, so this bounds its memory.", lower_bound=1,
                         module_name=WHOLE, **d)


def define_predict(fv=flags.FLAGS) -> None:
    """The flags of predict.py."""
    d = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "Run folder of train.py holding model.keras and "
                        "model_info.json.", required=True, module_name=OUTPUTS, **d)
    flags.DEFINE_string("data_dir", None, "Kaggle root (predicts test/) or a folder of images.",
                        required=True, module_name=DATA, **d)
    flags.DEFINE_string("output", "submission.csv", "CSV to write.", module_name=OUTPUTS, **d)
    flags.DEFINE_string("labels", None, "Optional labels of the images (a name,label CSV): "
                        "print the scores and draw <output>_roc.png, "
                        "<output>_confusion_matrix.png and <output>_top_losses.png.",
                        module_name=PREDICT, **d)
    flags.DEFINE_boolean("bag", None, "--bag: use the run's bag (bag.keras: the averaged "
                         "fold heads and final model); --nobag: model.keras alone. Default: what "
                         "train.py chose by evidence (model_info.json).", module_name=PREDICT, **d)
    flags.DEFINE_enum("output_format", "probabilities", ["probabilities", "label", "tags"],
                      "probabilities: name,<positive class column> (binary) or "
                      "name,<class_1>,...,<class_K>; label: name,label with the most probable "
                      "class; tags: name,tags with the labels above their thresholds "
                      "(multi-label).", module_name=OUTPUTS, **d)
    flags.DEFINE_boolean("unfamiliar_label", True, "With --output_format=label: write "
                         "'unfamiliar' instead of the class for a photo flagged unfamiliar "
                         "(--nounfamiliar_label: the class anyway; the unfamiliar columns say "
                         "which were flagged).", module_name=OUTPUTS, **d)
    flags.DEFINE_enum("unfamiliar_columns", "auto", ["auto", "true", "false"],
                      "Add unfamiliar_score and unfamiliar columns to the prediction CSV. auto: "
                      "yes, except for a Kaggle layout whose sample_submission.csv fixes the "
                      "columns (then they go to <output>_unfamiliar.csv).",
                      module_name=OUTPUTS, **d)
    flags.DEFINE_string("prior", None, "Move the probabilities to other class shares than "
                        "the training labels': CLASS:SHARE,... (two classes: one share), or "
                        "estimate: the shares of these photos, estimated by the EM procedure "
                        "of Saerens et al. 2002 and printed (rough below ~100 photos). "
                        "Default: what train.py stored (its --prior, else the training "
                        "shares).", module_name=PREDICT, **d)
    flags.DEFINE_string("explain", None, "Heatmaps (<output stem>_explain/): N, the N least "
                        "sure photos, or photo names, comma-separated.", module_name=OUTPUTS, **d)
    flags.DEFINE_boolean("keep_bad_rows", False, "With --on_bad_image=skip: keep a row for "
                         "each unreadable image, with empty values and a last column status "
                         "('ok' or 'unreadable: <reason>'), instead of leaving it out.",
                         module_name=OUTPUTS, **d)
    _shared(fv, "Test-time augmentation: auto = what train.py chose for the model (recorded "
                "in model_info.json), or average over N deterministic views (1 = plain; 2 adds "
                "the mirror; up to 8 adds crops).")
