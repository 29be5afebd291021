"""The Python API: the same jobs as the scripts, for notebooks and programs.

    import small_photo_classifier as spc
    run = spc.train("photos/", workdir="runs/photos", backbone="efficientnet_lite0.keras")
    run.metrics["headline"]              # what metrics.json says
    table = run.predict("new_photos/")   # a DataFrame: predict.py's numbers
    spc.load("runs/photos").predict(["a.jpg", "b.jpg"])

Flags are keyword arguments (``stage="heads"``, ``cv_folds=5``, ``noprobe_baseline`` as
``probe_baseline=False``), checked as train.py checks them; every problem the user can
fix is raised as one `UserError` whose message is train.py's paragraph. Each call puts
Keras' dtype policy, the random seeds and the logging handlers back as it found them
(`workflow.base.process_state`), so a user's own Keras work in the same kernel is not
changed by it.
"""

import contextlib
import html
import json
import os
import sys
from typing import Optional, Sequence, Union

import numpy as np

from small_photo_classifier.pipeline.errors import ConfigError, UserError

__all__ = ["Run", "UserError", "load", "train"]


def train(data_dir: Optional[str] = None, workdir: Optional[str] = None, **flags) -> "Run":
    """Runs train.py's job on ``data_dir`` into ``workdir`` (default ``runs/<data folder's
    name>``) with ``flags`` as train.py's flags, and returns the run. ``train(demo="binary")``
    runs the built-in demo."""
    from small_photo_classifier.workflow.base import config, console, process_state
    values, argv = _train_flags(dict(flags, data_dir=data_dir, workdir=workdir))
    with process_state.preserved(), _as_command(argv):
        console.setup_logging(stream=sys.stderr)
        cfg = config.train_config(values, sorted(values))  # checked before TensorFlow starts
        dataset = None if cfg.data.demo else config.discover(cfg.data, cfg.cache)
        console.load_tensorflow()
        from small_photo_classifier.workflow.train import job, stages
        stages.run(cfg, dataset)
        folder = job.run_folder_of(cfg.runtime.workdir, dataset.data_dir if dataset else "")
    return Run(folder)


def load(workdir: str) -> "Run":
    """The run in ``workdir`` (a train.py run folder), ready to predict and explain."""
    return Run(workdir)


class Run:
    """A train.py run folder: its model, what it measured, its report. The model is
    loaded on first use, once (`workflow.use.loaded`: predict.py's and serve.py's
    loader)."""

    def __init__(self, workdir: str):
        from small_photo_classifier.pipeline import run_info
        self.workdir = os.path.abspath(workdir)
        self.info = run_info.read_info(self.workdir)  # a clear error for a wrong folder
        self._loaded = None

    def __repr__(self) -> str:
        return f"Run({self.workdir!r})"

    @property
    def metrics(self) -> dict:
        """``metrics.json``: every number the run measured, with what it was measured on."""
        path = os.path.join(self.workdir, "metrics.json")
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    @property
    def report_path(self) -> Optional[str]:
        """``report.html`` (the whole run on one page), or None when it was not written."""
        path = os.path.join(self.workdir, "report.html")
        return path if os.path.isfile(path) else None

    @property
    def classes(self) -> list:
        return list(self.info["class_names"])

    def _model(self):
        from small_photo_classifier.workflow.use import loaded
        if self._loaded is None:
            self._loaded = loaded.load(self.workdir)
        return self._loaded

    def predict(self, source: Union[str, os.PathLike, Sequence[str], np.ndarray],
                batch_size: int = 32):
        """Calibrated probabilities of ``source`` — a folder (as predict.py reads it), a
        list of image paths, or images as an array ([N, H, W, 3] or [H, W, 3], RGB in
        0..255) — as a DataFrame: ``name``, the probability columns of predict.py's CSV
        (the same numbers), ``predicted``, and with the run's unfamiliar score
        ``unfamiliar_score`` and ``unfamiliar``. An unreadable image gets no number: its
        row has NaN and a ``status`` saying why."""
        from small_photo_classifier.workflow.base import process_state
        with process_state.preserved():
            run = self._model()
            _use_policy(run.policy)
            frame, outputs = _outputs(run, source, batch_size)
            probs, unfamiliar = run.apply(outputs)
        return _table(run, frame, probs, unfamiliar)

    def explain(self, photo: Union[str, os.PathLike, np.ndarray],
                class_: Optional[str] = None) -> np.ndarray:
        """Where the single exported model looked to call ``photo`` (a path, or an image
        array [H, W, 3] RGB 0..255) ``class_`` (default: the class it predicts): a
        heatmap in [0, 1] at the photo's own size (`features.serve.explain`: HiResCAM on
        the backbone's last spatial feature map, Grad-CAM behind average pooling)."""
        return self._explained(photo, class_).heatmap

    def explain_figure(self, photo, class_: Optional[str] = None):
        """`explain` drawn over the photo: a matplotlib Figure (shown inline in Jupyter)."""
        from small_photo_classifier.workflow.use import explaining
        return explaining.figure(self._explained(photo, class_))

    def _explained(self, photo, class_):
        from small_photo_classifier.pipeline import limits
        from small_photo_classifier.workflow.base import process_state
        from small_photo_classifier.workflow.use import explaining
        pixels = (explaining.as_pixels(photo) if isinstance(photo, np.ndarray) else
                  explaining.read_photo(os.fspath(photo), limits.MAX_PIXELS))
        with process_state.preserved():
            if getattr(self, "_explainer", None) is None:
                self._explainer = explaining.Explainer(self.workdir, self.info)
            return self._explainer.explain(pixels, class_)

    def _repr_html_(self) -> str:
        """In Jupyter: the headline and the report inline."""
        headline = html.escape(str(self.metrics.get("headline", "")))
        parts = [f"<p><b>Run</b> <code>{html.escape(self.workdir)}</code>: "
                 f"{html.escape(', '.join(self.classes))}</p><p>{headline}</p>"]
        if self.report_path:
            with open(self.report_path, encoding="utf-8") as f:
                page = f.read()
            parts.append(f'<iframe srcdoc="{html.escape(page, quote=True)}" '
                         'style="width:100%;height:600px;border:1px solid #ccc"></iframe>')
        return "".join(parts)


def _train_flags(given: dict):
    """(train.py's flags parsed from keyword arguments, the equivalent command line)."""
    from absl import flags as absl_flags
    from small_photo_classifier.workflow.base import flags as flag_defs
    values = absl_flags.FlagValues()
    flag_defs.define_train(values)
    argv = ["train.py"]
    for name, value in given.items():
        if value is None:
            continue
        if name not in values:
            raise ConfigError(f"train() got an unknown flag {name!r}: train.py --help lists "
                              "them (pass each as a keyword argument, e.g. cv_folds=5).")
        if isinstance(value, bool):
            argv.append(f"--{'' if value else 'no'}{name}")
        elif isinstance(value, (list, tuple)):
            argv.append(f"--{name}={','.join(map(str, value))}")
        else:
            argv.append(f"--{name}={value}")
    try:
        values(argv)
    except absl_flags.Error as err:
        raise ConfigError(f"{err} (train.py's flags as keyword arguments; train.py --help "
                          "lists them).") from None
    return values, argv


@contextlib.contextmanager
def _as_command(argv):
    """sys.argv as the equivalent train.py command while the job runs: what run_config.json
    and the report record as the command that made the run."""
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def _use_policy(policy: str) -> None:
    import keras
    keras.mixed_precision.set_global_policy(policy)


def _outputs(run, source, batch_size: int):
    """(frame of ``name``, ``path``, ``bad``, ``reason``; the network's outputs) of a
    folder, a list of paths or an array of images."""
    import pandas as pd
    from small_photo_classifier.pipeline import discovery, limits, scan
    from small_photo_classifier.workflow.use import explaining
    if isinstance(source, np.ndarray):
        images = source[None] if source.ndim == 3 else source
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"Images as an array: expected [N, H, W, 3] or [H, W, 3] RGB in "
                              f"0..255; got shape {tuple(source.shape)}.")
        frame = pd.DataFrame({"name": [f"image_{i}" for i in range(len(images))],
                              "path": "", "bad": False, "reason": ""})
        return frame, run.predict_images(explaining.eval_images(images, run.image_size),
                                         batch_size)
    if isinstance(source, (str, os.PathLike)):
        frame = discovery.discover_unlabelled(os.fspath(source))
    else:
        paths = [os.path.abspath(os.fspath(p)) for p in source]
        frame = pd.DataFrame({"path": paths, "name": [os.path.basename(p) for p in paths]})
    bad = dict(scan.scan_with_memo(frame.path.tolist(), run.image_size, None,
                                   max_pixels=limits.MAX_PIXELS))
    frame = frame.assign(bad=frame.path.isin(bad), reason=[bad.get(p, "") for p in frame.path])
    return frame, run.predict_frame(frame, batch_size, progress=False)


def _table(run, frame, probs, unfamiliar):
    """predict.py's columns as a DataFrame (see `Run.predict`)."""
    import pandas as pd
    from small_photo_classifier.workflow.base.outputs import binary_column
    task, thresholds = run.task, run.info.get("thresholds")
    probs = np.asarray(probs, np.float64)
    good = ~frame["bad"].to_numpy(bool)
    table = pd.DataFrame({"name": frame.name.tolist()})
    if task.kind == "binary":
        table[binary_column(task.class_names, None, run.info.get("binary_column"))] = probs
    else:
        for j, name in enumerate(task.class_names):
            table[name] = probs[:, j]
    hits = task.predicted(np.nan_to_num(probs), thresholds if task.kind != "multiclass"
                          else None)
    if task.kind == "multilabel":
        predicted = [" ".join(n for n, h in zip(task.class_names, row) if h) for row in hits]
    else:
        predicted = [task.class_names[int(b)] for b in hits]
    table["predicted"] = [p if g else None for p, g in zip(predicted, good)]
    if unfamiliar is not None:
        table["unfamiliar_score"] = unfamiliar["score"]
        table["unfamiliar"] = unfamiliar["flagged"]
    if not good.all():
        table["status"] = ["ok" if g else f"unreadable: {r}" for g, r in zip(good,
                                                                          frame.reason)]
    if (frame.path != "").any():
        table["path"] = frame.path.tolist()
    return table
