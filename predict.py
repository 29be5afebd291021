"""Predict P(positive class) for a folder of images with a model exported by train.py.

  python predict.py --workdir=runs/NAME --data_dir=DIR --output=submission.csv

DIR is a Kaggle root (its test/ folder is predicted, in the row order of
sample_submission.csv when present) or a plain folder of images. The CSV has
the header ``name,invasive``; it is written to a temporary name and renamed,
so an interrupted run never leaves a half-written file.
"""

import os

from pipeline import cli

cli.quiet_tensorflow()

import logging as py_logging  # noqa: E402

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder of train.py holding model.keras and "
                    "model_info.json.", required=True)
flags.DEFINE_string("data_dir", None, "Kaggle root (predicts test/) or a folder of images.",
                    required=True)
flags.DEFINE_string("output", "submission.csv", "CSV to write (name,invasive).")
flags.DEFINE_integer("batch_size", 32, "Images per batch.")
flags.DEFINE_integer("tta", 1, "Test-time augmentation: average over N deterministic views "
                     "(1 = plain; 2 adds the mirror; up to 8 adds crops).")
flags.DEFINE_string("labels", None, "Optional name,invasive CSV of true labels: print ROC AUC, "
                    "accuracy, confusion matrix and draw <output>_roc.png, "
                    "<output>_confusion_matrix.png and <output>_top_losses.png.")
flags.DEFINE_boolean("bag", True, "Use the run's bag (bag.keras: the averaged fold heads and "
                     "final model) when it has one; --nobag uses model.keras alone.")
flags.DEFINE_enum("precision", "auto", ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
                  "Compute precision (as train.py's): auto picks bfloat16/float16 where the "
                  "hardware has them, float32 otherwise, whatever the model was trained in.")
flags.DEFINE_enum("strategy", "auto", ["auto", "one", "mirrored"], "As train.py's: split each "
                  "batch over all local GPUs (or --cpu_replicas) with MirroredStrategy.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into N logical devices (for tests).")
flags.DEFINE_string("ray_address", None, "Predict on a Ray cluster (as train.py's): 'local', "
                    "'auto' or HOST:PORT; workers load the model from --workdir, which must be "
                    "readable at the same path on every node.")
flags.DEFINE_integer("ray_workers", 2, "Ray actor workers, each holding one model copy.")
flags.DEFINE_enum("on_bad_image", "fail", ["fail", "skip"], "An image that cannot be decoded: "
                  "stop (fail), or write the fallback probability 0.5 for it with a warning "
                  "(skip), since a submission must list every name.")


def run():
    """Loads the model, predicts every image in order, writes the CSV (and scores)."""
    from features import inference, precision
    from pipeline import discovery, scan

    use_bag = FLAGS.bag and os.path.isfile(os.path.join(FLAGS.workdir, inference.BAG_FILE))
    chosen = precision.resolve_and_apply(FLAGS.precision)
    model, info = inference.load_exported(FLAGS.workdir, bag=use_bag, policy=chosen.policy)
    inference.check_tta(FLAGS.tta)
    image_size = int(info["image_size"])
    frame = discovery.discover_unlabelled(FLAGS.data_dir)
    report = os.path.splitext(FLAGS.output)[0] + "_bad_images.csv"
    frame = scan.filter_bad_images(frame, image_size, FLAGS.on_bad_image, report,
                                   keep_rows=True)
    logging.info("Predicting %d images with %s (positive class %r, %d px, tta=%d, %s).",
                 len(frame), inference.BAG_FILE if use_bag else inference.MODEL_FILE,
                 info.get("positive_class"), image_size, FLAGS.tta, chosen.policy)
    from pipeline import progress
    progress.report("predict", f"predict again ({FLAGS.output} is only written once every "
                               "row is done)")
    engine = None
    if FLAGS.ray_address:
        from features import ray_engine
        engine = ray_engine.RayEngine(FLAGS.ray_address, FLAGS.ray_workers,
                                      precision=chosen.policy).start()
    try:
        probs = inference.predict_frame(model, frame, image_size, FLAGS.batch_size, FLAGS.tta,
                                        engine=engine, workdir=FLAGS.workdir, bag=use_bag)
    finally:
        if engine is not None:
            engine.stop()
    inference.write_predictions(frame.name, probs, FLAGS.output)
    used = (f"bag of {info.get('bag', {}).get('members', '?')} models" if use_bag
            else "one model")
    print(f"Wrote {len(frame)} predictions of P({info.get('positive_class')}) to {FLAGS.output} "
          f"({used})")
    if FLAGS.labels:
        from features import interpret
        stem = os.path.splitext(FLAGS.output)[0]
        scores = inference.score_against_labels(frame.name.tolist(), probs, FLAGS.labels)
        print(inference.format_scores(scores))
        good = ~frame["bad"].to_numpy(bool) if "bad" in frame else slice(None)
        y = inference.labels_for(frame.name.tolist(), FLAGS.labels)
        classes = info.get("class_names") or ("0", "1")
        plots = interpret.write_all(os.path.dirname(stem), frame.path[good].tolist(), y[good],
                                    probs[good], classes, prefix=os.path.basename(stem) + "_")
        for what, path in plots.items():
            print(f"{what}: {path}")
        return scores
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    py_logging.getLogger().setLevel(py_logging.INFO)
    with cli.user_errors():
        from features import distribute
        with distribute.scope(distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_replicas)):
            run()


if __name__ == "__main__":
    app.run(main)
