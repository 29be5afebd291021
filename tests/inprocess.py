"""train.py and predict.py run inside the test process: what their ``main`` does, with
fresh flags, the output captured, and every piece of global state put back.

A subprocess costs a TensorFlow import (about 8 s of CPU here) before any work; the
suite starts one per entry point as a smoke test (`tests/test_finetune_predict.py`:
quiet start-up, exit codes, the log file) and runs every other stage through this.
"""

import io
import logging
import subprocess
import sys
import traceback


def _train(fv) -> None:
    from small_photo_classifier.workflow.base import config, console, demo_settings
    cfg = config.train_config(fv, list(fv))
    if cfg.data.demo:
        print(demo_settings.describe(fv))
    dataset = None if cfg.data.demo else config.discover(cfg.data, cfg.cache)
    console.load_tensorflow()
    from small_photo_classifier.workflow.train import stages
    stages.run(cfg, dataset)


def _predict(fv) -> None:
    from small_photo_classifier.features import distribute
    from small_photo_classifier.workflow.base import console
    from small_photo_classifier.workflow.use import predicting
    from small_photo_classifier.workflow.use.predicting import PredictRun
    cfg = PredictRun.from_flags(fv)
    prepared = predicting.prepare(cfg)
    console.load_tensorflow()
    with distribute.scope(distribute.make_strategy(cfg.strategy, cfg.cpu_replicas)):
        predicting.run(cfg, prepared)


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python <script> <args>`` as a `subprocess.CompletedProcess` (returncode, stdout,
    stderr), run in this process. Only for train.py and predict.py, and not for
    --cpu_replicas (which must split the CPU before TensorFlow starts)."""
    import keras
    from absl import flags as absl_flags
    from small_photo_classifier.workflow.base import console, flags as flag_defs
    assert script in ("train.py", "predict.py"), script
    assert not any(a.startswith("--cpu_replicas") for a in args), "needs a fresh process"
    fv = absl_flags.FlagValues()
    (flag_defs.define_train if script == "train.py" else flag_defs.define_predict)(fv)
    fv([script, *args])
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, list(console.DETAIL.handlers),
             console.DETAIL.level, sys.stdout, sys.stderr, sys.__stderr__, sys.argv,
             dict(console._STATE))
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr, sys.__stderr__ = out, err, err  # where the scripts' lines go
    sys.argv = [script, *args]
    console._STATE.clear()  # a transcript (train.log) of this run's own
    code = 0
    try:
        console.setup_logging()
        with console.user_errors():
            (_train if script == "train.py" else _predict)(fv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except Exception:  # what a subprocess would print before exiting 1
        traceback.print_exc(file=err)
        code = 1
    finally:
        transcript = console._STATE.get("transcript")
        if transcript is not None and transcript.file is not None:
            transcript.file.close()
        (root.handlers[:], level, console.DETAIL.handlers[:], detail_level, sys.stdout,
         sys.stderr, sys.__stderr__, sys.argv, state) = saved
        root.setLevel(level)
        console.DETAIL.setLevel(detail_level)
        console._STATE.clear()
        console._STATE.update(state)
        keras.mixed_precision.set_global_policy("float32")
        keras.backend.clear_session()
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
