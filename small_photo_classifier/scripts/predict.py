"""Predict class probabilities for a folder of images with a model exported by train.py.

  python predict.py --workdir=runs/NAME --data_dir=DIR --output=submission.csv

DIR is a Kaggle root (its test/ folder is predicted, in the row order of
sample_submission.csv when present) or a plain folder of images. A binary model
writes ``name,<positive class column>`` (``name,invasive`` for the Kaggle
layout); a multi-class one ``name,<class_1>,...,<class_K>``. The CSV is written
to a temporary name and renamed, so an interrupted run never leaves a
half-written file.
"""

from small_photo_classifier.workflow.base import console

console.quiet_tensorflow()

from absl import app, flags  # noqa: E402

from small_photo_classifier.workflow.base import flags as flag_defs, script_help  # noqa: E402
from small_photo_classifier.workflow.use.predicting import PredictRun  # noqa: E402

FLAGS = flags.FLAGS
flag_defs.define_predict(FLAGS)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    console.setup_logging()
    with console.user_errors():
        cfg = PredictRun.from_flags(FLAGS)  # checked before TensorFlow starts
        from small_photo_classifier.workflow.use import predicting
        prepared = predicting.prepare(cfg)  # run folder, images, labels: no TensorFlow yet
        console.load_tensorflow()
        from small_photo_classifier.features import distribute
        with distribute.scope(distribute.make_strategy(cfg.strategy, cfg.cpu_replicas)):
            predicting.run(cfg, prepared)


def run() -> None:
    """The command line: ``python predict.py`` and ``small-photo-classifier predict``."""
    script_help.run_script(main, FLAGS, __doc__)


if __name__ == "__main__":
    run()
