"""Train a transfer-learning image classifier on a folder of labelled photos: an
ImageNet backbone (VGG16 by default, any keras.applications name or .keras file, or
chosen by evidence with --backbone=auto) with a new head.

Stages (--stage):
  heads     extract the frozen backbone's features once into an HDF5 cache
            (--cache_dir), then train the dense-layer scenarios A, B, C on the cache
            in seconds, beside a linear-probe baseline;
  sweep     score a grid (scenario x learning rate x optimizer x dropout x cached
            augmented views) from the cache by stratified K-fold CV -> sweep.csv;
  finetune  fine-tune the chosen scenario's blocks end to end on augmented
            images, keep the best model, export model.keras (and bag.keras);
  all       (default) heads -> choose the best scenario -> finetune -> predict
            the test set if the data has one;
  backbones compare --backbones (each at its input size) on the same folds and
            stop (--backbone=auto compares, then goes on with the choice);
  curve     how much more labels should add (a learning curve, from the cache);
  label_next which unlabelled photos (--unlabelled_dir) to label next.

Quick start, offline, on built-in SYNTHETIC data:  python train.py --demo
Real data:  python train.py --data_dir=PATH [--weights=imagenet] [--workdir=runs/NAME]
"""

from small_photo_classifier.workflow.base import console

console.quiet_tensorflow()

from absl import app, flags  # noqa: E402

from small_photo_classifier.workflow.base import (config, demo_settings, flags as flag_defs,
                                                  script_help)  # noqa: E402

FLAGS = flags.FLAGS
_BEFORE = set(FLAGS)
flag_defs.define_train(FLAGS)
OUR_FLAGS = sorted(set(FLAGS) - _BEFORE)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    console.setup_logging()
    with console.user_errors():
        cfg = config.train_config(FLAGS, OUR_FLAGS)  # checked before TensorFlow starts
        if cfg.data.demo:
            print(demo_settings.describe(FLAGS))
        dataset = None
        if not cfg.data.demo:  # the folder, the labels CSV, the classes: no TensorFlow yet
            dataset = config.discover(cfg.data, cfg.cache)
        console.load_tensorflow()
        if cfg.runtime.cpu_replicas > 1:  # before anything starts TensorFlow's devices
            from small_photo_classifier.features import distribute
            distribute.split_cpu(cfg.runtime.cpu_replicas)
        from small_photo_classifier.workflow.train import stages
        stages.run(cfg, dataset)


def run() -> None:
    """The command line: ``python train.py`` and ``small-photo-classifier train``."""
    script_help.run_script(main, FLAGS, __doc__)


if __name__ == "__main__":
    run()
