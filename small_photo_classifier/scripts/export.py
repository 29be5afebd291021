"""Export a trained model for deployment: SavedModel, ONNX, TFLite (optionally quantized).

  python export.py --workdir=runs/NAME --export=savedmodel,onnx,tflite [--quantize=int8]

Reads ``model.keras`` of a train.py run folder, writes ``savedmodel/``, ``model.onnx``
and ``model.tflite`` (``model_<q>.tflite`` with --quantize) beside it, loads each
with its own runtime in a fresh process and compares its predictions on the run's
validation images with model.keras (recorded in metrics.json under ``exports``).
train.py --export=... does the same at the end of a run.
"""

from small_photo_classifier.workflow.base import console

console.quiet_tensorflow()

from absl import app, flags  # noqa: E402

from small_photo_classifier.workflow.base import flags as flag_defs, script_help  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder of train.py holding model.keras.",
                    required=True, module_name=flag_defs.OUTPUTS)
flags.DEFINE_integer("batch_size", 32, "Images per batch when reading the validation images.",
                     module_name=flag_defs.DEVICES)
flag_defs.define_export(FLAGS)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    console.setup_logging()
    with console.user_errors():
        from small_photo_classifier.workflow.base import config
        formats = config.parse_formats(FLAGS.export)  # checked before TensorFlow starts
        if not formats:
            raise app.UsageError("Pass --export=savedmodel,onnx,tflite (one or more).")
        import os
        from small_photo_classifier.pipeline.errors import ConfigError
        if not os.path.isfile(os.path.join(FLAGS.workdir, "model.keras")):
            raise ConfigError(f"--workdir={FLAGS.workdir}: no model.keras there (train.py "
                              "writes it at the end of a run).")
        console.log_to_file(os.path.join(FLAGS.workdir, "export.log"))
        console.load_tensorflow()
        from small_photo_classifier.workflow.use import deploy
        deploy.deploy_run(FLAGS.workdir, formats, FLAGS.quantize, FLAGS.batch_size)


def run() -> None:
    """The command line: ``python export.py`` and ``small-photo-classifier export``."""
    script_help.run_script(main, FLAGS, __doc__)


if __name__ == "__main__":
    run()
