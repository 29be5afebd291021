"""Serve a trained run over HTTP: a predict page, a JSON API and a label page.

  python serve.py --workdir=runs/NAME            # then open http://127.0.0.1:8000/

Loads the run's default model once (what predict.py uses: bag or single model, its TTA,
its calibration and unfamiliar score). Pages: / (predict: drop photos, download the CSV
predict.py writes) and /label (the run's to_label.csv and suspect_labels.csv, one photo at
a time; answers go to RUN/labels/reviewed.csv at once). API: POST /api/predict
(multipart field "files"), GET /api/health, GET /api/labels; documented at /docs.

Bound to 127.0.0.1 unless --host says otherwise; off loopback every request needs the
token (--token, or one generated and printed once). It answers only to its own host names
(--allowed_hosts adds some), refuses changes from pages of other sites, and bounds every
request (--max_request_mb, --max_upload_mb, --max_files, --max_pixels) before reading it
whole. Needs: pip install -e ".[serve]".
"""

from small_photo_classifier.workflow.base import console

console.quiet_tensorflow()

from absl import app, flags  # noqa: E402

from small_photo_classifier.pipeline import limits  # noqa: E402
from small_photo_classifier.workflow.base import flags as flag_defs, script_help  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run folder of train.py holding model.keras.",
                    required=True, module_name=flag_defs.OUTPUTS)
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on. Off loopback (e.g. 0.0.0.0) "
                    "every request needs the token.", module_name=flag_defs.OUTPUTS)
flags.DEFINE_integer("port", 8000, "Port to listen on.", module_name=flag_defs.OUTPUTS)
flags.DEFINE_string("token", None, "Secret every request must carry (Authorization: Bearer, "
                    "or ?token= once in the browser). Default: none on loopback; off "
                    "loopback one is generated and printed once.", module_name=flag_defs.OUTPUTS)
flags.DEFINE_list("allowed_hosts", [], "Host names the server answers to besides "
                  "loopback's and --host (e.g. the machine's name when serving off loopback); "
                  "a request for any other Host gets 400 (DNS rebinding).",
                  module_name=flag_defs.OUTPUTS)
flags.DEFINE_float("max_upload_mb", 20.0, "Largest image accepted per file, in MB.",
                   module_name=flag_defs.PREDICT)
flags.DEFINE_integer("max_files", 32, "Most images accepted in one request.",
                     module_name=flag_defs.PREDICT)
flags.DEFINE_float("max_request_mb", 100.0, "Largest request body, in MB: a Content-Length "
                   "over it gets 413 before anything is read, a chunked body is cut there.",
                   module_name=flag_defs.PREDICT)
flags.DEFINE_integer("max_pixels", limits.MAX_PIXELS, "An uploaded image with more pixels "
                     "(read from its header, before decoding) gets 413.", lower_bound=1,
                     module_name=flag_defs.PREDICT)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    console.setup_logging()
    with console.user_errors():
        import importlib.util
        from small_photo_classifier.pipeline import run_info
        from small_photo_classifier.pipeline.errors import ConfigError
        from small_photo_classifier.workflow.use import serving
        missing = [m for m in ("fastapi", "uvicorn", "multipart")
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"serve.py needs {', '.join(missing)}, which is not installed: "
                              "python -m pip install -e \".[serve]\"")
        run_info.read_info(FLAGS.workdir)  # a clear error before TensorFlow starts
        config = serving.config_from(FLAGS.host, FLAGS.port, FLAGS.token, FLAGS.allowed_hosts,
                                     (FLAGS.max_upload_mb, FLAGS.max_files,
                                      FLAGS.max_request_mb, FLAGS.max_pixels))
        token = config.token
        console.load_tensorflow()
        import uvicorn
        from small_photo_classifier.workflow.use import server_app
        application = server_app.create_app(FLAGS.workdir, config)
        from small_photo_classifier.workflow.use import web_guard
        names = web_guard.Guard.for_server(config.host, config.port, config.allowed_hosts).hosts
        shown = "localhost" if FLAGS.host in ("0.0.0.0", "::") else FLAGS.host
        print(f"Serving {FLAGS.workdir} on http://{shown}:{FLAGS.port}/ (label page: /label, "
              f"API: /docs); it answers to the host names {', '.join(sorted(names))}"
              + (f"\ntoken (shown once): {token} - open "
                               f"http://{shown}:{FLAGS.port}/?token={token}"
                               if token and not FLAGS.token else ""), flush=True)
        uvicorn.run(application, host=FLAGS.host, port=FLAGS.port, log_level="warning")


def run() -> None:
    """The command line: ``python serve.py`` and ``small-photo-classifier serve``."""
    script_help.run_script(main, FLAGS, __doc__)


if __name__ == "__main__":
    run()
