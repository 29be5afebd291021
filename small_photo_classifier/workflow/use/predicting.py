"""predict.py's job: load an exported model, predict a folder in order, write the CSV,
and (with labels) score the predictions."""

import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np

from small_photo_classifier.features import trust
from small_photo_classifier.features.task import Task
from small_photo_classifier.pipeline import limits
from small_photo_classifier.pipeline.errors import ConfigError, DataError
from small_photo_classifier.workflow.base import config as config_lib
from small_photo_classifier.workflow.base import prior as prior_lib
from small_photo_classifier.workflow.use import explaining, loaded


@dataclasses.dataclass(frozen=True)
class PredictRun(config_lib.Devices):
    """Every setting of one predict.py run."""
    workdir: str = ""
    data_dir: str = ""
    output: str = "submission.csv"
    output_format: str = "probabilities"
    labels: Optional[str] = None
    bag: Optional[bool] = None   # None: what train.py chose (model_info.json)
    tta: str = "auto"
    on_bad_image: str = "fail"
    max_pixels: int = limits.MAX_PIXELS
    keep_bad_rows: bool = False
    unfamiliar_label: bool = True
    unfamiliar_columns: str = "auto"
    prior: Optional[str] = None  # --prior: the field's class shares, or "estimate"
    explain: Optional[str] = None  # --explain: a count, or names of photos

    @classmethod
    def from_flags(cls, flag_values) -> "PredictRun":
        """Reads and checks predict.py's flags (no TensorFlow needed)."""
        config_lib.parse_tta(flag_values.tta)
        prior_lib.check_text(flag_values.prior, allow_estimate=True)
        if flag_values.labels and not os.path.exists(flag_values.labels):
            raise DataError(f"--labels={flag_values.labels!r}: no such file or folder.")
        return cls.from_values({name: flag_values[name].value for name in flag_values})


def labels_for(names: Sequence[str], labels_path: str, task: Task) -> np.ndarray:
    """The label of each name, in the order of ``names`` and the encoding of the model's
    ``task``, from a labels CSV or from a tree of class folders."""
    from small_photo_classifier.pipeline import discovery, labels
    if os.path.isdir(labels_path):
        table = discovery.folder_labels(labels_path).rename(columns={"class": "label_name"})
        given = sorted(set(table.label_name))
    else:
        read = labels.read_labels(labels_path, task=task.kind,
                                  class_order=None if task.kind == "binary" else
                                  task.class_names)
        table, given = read.frame, list(read.class_names)
        if task.kind != "multilabel":
            table = table.assign(label_name=[read.class_names[int(v)] for v in table.label])
    if task.kind != "multilabel":
        known = set(task.class_names) | ({"0", "1"} if task.kind == "binary" else set())
        unknown = sorted(set(given) - known)
        if unknown:
            raise DataError(f"{labels_path} has class(es) {labels.listing(unknown)} that the "
                            f"model was not trained on; it knows {labels.listing(task.class_names)}.")
        index = {n: i for i, n in enumerate(task.class_names)}
        index.update({"0": 0, "1": 1} if task.kind == "binary" else {})
        by_name = dict(zip(table.name, (index[n] for n in table.label_name)))
    else:
        by_name = dict(zip(table.name, table.label))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"{labels_path} has no label for {len(missing)} predicted image(s), "
                        f"e.g. {missing[:3]}.")
    y = np.array([by_name[n] for n in names])
    if task.kind == "binary" and len(np.unique(y)) < 2:
        raise DataError(f"{labels_path}: the predicted images are all of one class; ROC AUC "
                        "needs both.")
    return y


def score_against_labels(names: Sequence[str], probs, labels_csv: str,
                         task: Task = Task("binary", ("0", "1")), thresholds=None) -> dict:
    """The task's scores (and, binary, the confusion matrix) against known labels."""
    from sklearn import metrics as sk_metrics
    y = labels_for(names, labels_csv, task)
    p = np.asarray(probs, np.float64)
    result = {**task.scores(y, p, thresholds), "n": int(len(y))}
    if task.kind == "binary":
        matrix = sk_metrics.confusion_matrix(y, task.predicted(p, thresholds), labels=[0, 1])
        result["confusion_matrix"] = {"tn": int(matrix[0, 0]), "fp": int(matrix[0, 1]),
                                      "fn": int(matrix[1, 0]), "tp": int(matrix[1, 1])}
        result["threshold"] = float(np.ravel(thresholds)[0]) if thresholds is not None else 0.5
    return result


def format_scores(scores: dict, task: Task = Task("binary", ("0", "1"))) -> str:
    """Human-readable lines for `score_against_labels` output (the caller names the model
    and the images: "model.keras on 49 labelled images of DIR: ...")."""
    if task.kind != "binary":
        shown = [k for k in (task.headline, "accuracy", "auc", "top5_accuracy", "f1_micro",
                             "f1_macro", "loss") if k in scores]
        return ", ".join(f"{k} {scores[k]:.4f}" for k in dict.fromkeys(shown))
    text = f"ROC AUC {scores['auc']:.4f}, accuracy {scores['accuracy']:.4f}"
    cm = scores.get("confusion_matrix")
    if cm:
        neg, pos = task.class_names
        width = max(8, len(neg), len(pos)) + 2
        text += (f"\nconfusion matrix (rows: true class, columns: predicted class at "
                 f"{scores.get('threshold', 0.5):g}):\n"
                 f"  {'':{width}s}{neg:>{width}s}{pos:>{width}s}\n"
                 f"  {neg:{width}s}{cm['tn']:{width}d}{cm['fp']:{width}d}\n"
                 f"  {pos:{width}s}{cm['fn']:{width}d}{cm['tp']:{width}d}")
    return text


def write_output(frame, probs, cfg: "PredictRun", task: Task, info: dict,
                 unfamiliar: Optional[dict] = None) -> int:
    """The prediction CSV in ``--output_format``: probabilities, the top class, or tags.

    Rows of images that could not be read (``frame.bad``) are left out, or with
    ``--keep_bad_rows`` kept with empty values and a ``status`` column: such an image
    never gets a number or a class. With ``unfamiliar`` (`trusted.apply`) the columns
    ``unfamiliar_score`` and ``unfamiliar`` (1 = flagged) follow, or for a Kaggle layout
    whose sample submission fixes the columns they go to ``<output>_unfamiliar.csv``;
    ``--output_format=label`` writes ``unfamiliar`` for a flagged photo unless
    ``--nounfamiliar_label``. Returns the number of predicted rows written."""
    from small_photo_classifier.pipeline import discovery
    from small_photo_classifier.workflow.base.outputs import binary_column, write_predictions
    good = ~frame["bad"].to_numpy(bool) if "bad" in frame else np.ones(len(frame), bool)
    status = None
    if cfg.keep_bad_rows:
        names, reasons = frame.name.tolist(), frame.get("reason", [""] * len(frame))
        status = ["ok" if g else f"unreadable: {r}".strip().rstrip(":")
                  for g, r in zip(good, reasons)]
    else:
        frame, probs = frame[good], np.asarray(probs)[good]
        names = frame.name.tolist()
        if unfamiliar is not None:
            unfamiliar = {**unfamiliar, "score": unfamiliar["score"][good],
                          "flagged": unfamiliar["flagged"][good]}
    thresholds = info.get("thresholds")
    sample = os.path.join(cfg.data_dir, discovery.SAMPLE_SUBMISSION_CSV)
    fixed_columns = os.path.isfile(sample) and cfg.output_format == "probabilities"
    column = binary_column(task.class_names, sample if os.path.isfile(sample) else None,
                           info.get("binary_column"))
    extra = unfamiliar_columns(unfamiliar)
    if extra and (cfg.unfamiliar_columns == "false" or
                  (cfg.unfamiliar_columns == "auto" and fixed_columns)):
        if cfg.unfamiliar_columns == "auto":
            side = os.path.splitext(cfg.output)[0] + "_unfamiliar.csv"
            write_predictions(names, np.zeros((len(names), 0)), side, [], status=status,
                              extra=extra)
            print(f"{side}: the unfamiliar columns ({cfg.output} keeps the columns of "
                  f"{discovery.SAMPLE_SUBMISSION_CSV})")
        extra = None
    if cfg.output_format == "probabilities":
        write_predictions(names, probs, cfg.output, task.class_names, column, status=status,
                          extra=extra)
    elif cfg.output_format == "tags":
        hits = task.predicted(np.nan_to_num(probs), thresholds)
        write_predictions(names, probs, cfg.output, task.class_names, status=status, values=(
            "tags", [" ".join(n for n, h in zip(task.class_names, row) if h) for row in hits]),
            extra=extra)
    else:
        best = task.predicted(np.nan_to_num(probs),
                              thresholds if task.kind == "binary" else None)
        labels = [task.class_names[int(b)] for b in best]
        if unfamiliar is not None and cfg.unfamiliar_label:
            labels = ["unfamiliar" if f else l for l, f in zip(labels, unfamiliar["flagged"])]
        write_predictions(names, probs, cfg.output, task.class_names, status=status,
                          values=("label", labels), extra=extra)
    return int(good.sum())


def unfamiliar_columns(unfamiliar: Optional[dict]) -> Optional[dict]:
    """The CSV columns of the unfamiliar score and flag (None without them)."""
    if unfamiliar is None:
        return None
    return {"unfamiliar_score": [f"{s:.4f}" for s in unfamiliar["score"]],
            "unfamiliar": [str(int(f)) for f in unfamiliar["flagged"]]}


def check_output_format(output_format: str, kind: str) -> None:
    """--output_format against the model's task, before any image is read."""
    if output_format == "tags" and kind != "multilabel":
        raise ConfigError("--output_format=tags is for multi-label models; this one is "
                          f"{kind} (use label or probabilities).")
    if output_format == "label" and kind == "multilabel":
        raise ConfigError("--output_format=label gives one class per image; a multi-label "
                          "model's is --output_format=tags.")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What predict.py checks before TensorFlow starts: the run folder's description, the
    task, the images in output order and (with --labels) their labels."""
    info: dict
    task: Task
    frame: object           # pandas DataFrame: path, name
    truth: Optional[np.ndarray]


def prepare(cfg: PredictRun) -> Prepared:
    """Every check that needs no TensorFlow, in the order a user fixes them: the run
    folder, the output format, the images, the labels (classes the model does not know
    are an error before anything is predicted or written)."""
    from small_photo_classifier.pipeline import discovery, run_info
    info = run_info.read_info(cfg.workdir)
    task = Task.of_model(info)
    check_output_format(cfg.output_format, task.kind)
    frame = discovery.discover_unlabelled(cfg.data_dir)
    if cfg.explain:
        # A wrong name fails here, before anything is predicted.
        explaining.chosen_rows(cfg.explain, frame.name.tolist(), frame.path.tolist())
    truth = labels_for(frame.name.tolist(), cfg.labels, task) if cfg.labels else None
    return Prepared(info, task, frame, truth)


def run(cfg: PredictRun, prepared: Optional[Prepared] = None) -> Optional[dict]:
    """Loads the model, predicts every readable image in order, writes the CSV (and
    scores)."""
    from small_photo_classifier.pipeline import progress, scan
    from small_photo_classifier.workflow.base import console
    prepared = prepared or prepare(cfg)
    stem = os.path.splitext(cfg.output)[0]
    console.log_to_file(stem + ".log")  # beside the output: what this prediction did
    info, task, truth = prepared.info, prepared.task, prepared.truth
    frame = scan.filter_bad_images(prepared.frame, int(info["image_size"]), cfg.on_bad_image,
                                   stem + "_bad_images.csv", keep_rows=True,
                                   max_pixels=cfg.max_pixels)
    run = loaded.load(cfg.workdir, cfg.bag, config_lib.parse_tta(cfg.tta), cfg.precision,
                      unfamiliar=not cfg.ray_address)
    info = run.info
    logging.info("Predicting %d images with %s (%s, %d px, tta=%d, %s).",
                 int((~frame.bad).sum()), run.model_file, task.describe(), run.image_size,
                 run.tta, run.policy)
    progress.report("predict", f"predict again ({cfg.output} is only written once every "
                               "row is done)")
    outputs = _outputs(cfg, run, frame)
    if cfg.prior:
        info = _with_prior(cfg.prior, task, info, outputs, run.units)
    probs, unfamiliar = run.apply(outputs, info)
    if unfamiliar is None:
        print(_why_untrusted(cfg, info))
    written = write_output(frame, probs, cfg, task, info, unfamiliar)
    used = run.describe()
    _say_written(cfg, frame, task, written, used, unfamiliar)
    if cfg.explain:
        _explain(cfg, run, frame, probs)
    if truth is None:
        return None
    good = ~frame.bad.to_numpy(bool)
    if unfamiliar is not None:
        frame = frame.assign(unfamiliar=unfamiliar["flagged"])
    return _score(cfg, frame[good].reset_index(drop=True), probs[good], truth[good], task,
                  info, stem, f"{run.model_file} (tta={run.tta})")


def _say_written(cfg: PredictRun, frame, task: Task, written: int, used: str,
                 unfamiliar: Optional[dict]) -> None:
    """What the console says of a finished prediction: the rows written, the photos
    flagged unfamiliar (and where to see the most unfamiliar), the unreadable ones."""
    stem = os.path.splitext(cfg.output)[0]
    print(f"Wrote {written} predictions of {_what(cfg.output_format, task)} to {cfg.output} "
          f"({used})")
    if unfamiliar is not None:
        n_flagged = int(unfamiliar["flagged"].sum())
        print(f"{n_flagged} of {written} photos ({n_flagged / max(1, written):.1%}) flagged "
              f"unfamiliar (unfamiliar_score > {unfamiliar['threshold']:.3f}, the threshold that "
              f"flags {unfamiliar['rate']:.0%} of held-out photos of the known classes)")
        print(f"most unfamiliar photos: {_gallery(stem, frame, unfamiliar)}")
    unreadable = int(frame.bad.sum())
    if unreadable:
        print(f"{unreadable} unreadable image(s) got no prediction "
              + ("(rows with empty values and a status) " if cfg.keep_bad_rows else
                 "(left out) ") + f"- listed with the reason in {stem}_bad_images.csv")


def _explain(cfg: PredictRun, run, frame, probs) -> None:
    """--explain: the overlays of the photos it names, or of the N least sure ones."""
    named = explaining.chosen_rows(cfg.explain, frame.name.tolist(), frame.path.tolist())
    good = ~frame.bad.to_numpy(bool)
    if named is None:
        rows = explaining.most_uncertain(run.task, probs, int(cfg.explain))  # NaN: unread
        which = f"the {len(rows)} photos the model is least sure of"
    else:
        rows = [i for i in named if good[i]]
        which = f"the {len(rows)} photos named" + (
            f" ({len(named) - len(rows)} unreadable, left out)" if len(rows) < len(named) else "")
    folder = os.path.splitext(cfg.output)[0] + "_explain"
    written = explaining.write_overlays(cfg.workdir, run.info, frame, rows, folder,
                                        cfg.precision, cfg.max_pixels)
    print(f"Wrote {len(written)} heatmaps to {folder}/ ({which}; where model.keras looked "
          "for the class it predicts)")


def _with_prior(text: str, task: Task, info: dict, outputs, units: int) -> dict:
    """``info`` whose calibration moves the probabilities to ``--prior``'s shares (or the
    shares the EM procedure estimates in these photos), said on the console."""
    calibration = trust.Calibration.from_json(info.get("calibration"))
    unshifted = calibration.apply(task.kind, task.probabilities(
        np.asarray(outputs, np.float64)[:, :units]), shift=False)
    shift, field, said = prior_lib.for_prediction(text, task, info, unshifted)
    print(said)
    return {**info, "calibration": {**calibration.to_json(), "prior_shift": list(shift)},
            "prior": {**(info.get("prior") or {}), "field": dict(zip(task.class_names,
                                                                      map(float, field))),
                      "source": f"predict.py --prior={text}"}}


def _outputs(cfg: PredictRun, run, frame):
    """The network's outputs per row of ``frame`` (NaN rows for unreadable images), here
    or on Ray workers with --ray_address."""
    engine = None
    if cfg.ray_address:
        # Only with --ray_address: Ray is optional.
        from small_photo_classifier.features.serve import ray_engine
        engine = ray_engine.RayEngine(cfg.ray_address, cfg.ray_workers,
                                      precision=run.policy).start()
    try:
        remote = (ray_engine.RemoteModel(engine, cfg.workdir, run.use_bag)
                  if engine is not None else None)
        return run.predict_frame(frame, cfg.batch_size, remote=remote)
    finally:
        if engine is not None:
            engine.stop()


def _gallery(stem: str, frame, unfamiliar: dict, n: int = 9) -> str:
    """``<stem>_unfamiliar.png``: the ``n`` predicted photos least like the training
    photos, with their scores."""
    from small_photo_classifier.workflow.views import plots
    score = np.nan_to_num(unfamiliar["score"], nan=-np.inf)
    order = [int(i) for i in np.argsort(-score)[:n] if np.isfinite(score[i])]
    captions = [f"unfamiliar_score {score[i]:.2f}" + (" (flagged)" if unfamiliar["flagged"][i]
                                                      else "") for i in order]
    return plots.gallery(frame.path.tolist(), order, captions, stem + "_unfamiliar.png",
                         f"The {len(order)} most unfamiliar photos (threshold "
                         f"{unfamiliar['threshold']:.2f})")


def _why_untrusted(cfg: PredictRun, info: dict) -> str:
    """The line saying why this prediction has no unfamiliar columns."""
    if cfg.ray_address:
        return ("note: no unfamiliar scores with --ray_address (the Ray workers return the "
                "model's outputs only); probabilities are calibrated as stored.")
    if not info.get("unfamiliar"):
        return (f"note: {cfg.workdir} was exported before calibration and unfamiliar scores "
                "(its model_info.json has neither): probabilities are the model's own and "
                "the CSV has no unfamiliar columns. Train again to get both.")
    return (f"note: {cfg.workdir} has no usable reference features "
            f"({info['unfamiliar'].get('reference_file')} or its bag is missing or from an "
            "old run): no unfamiliar columns; probabilities calibrated as stored (calibration: "
            f"{trust.Calibration.from_json(info.get('calibration')).kind}).")


def _what(output_format: str, task: Task) -> str:
    """What each written row holds, for the closing line."""
    if output_format == "label":
        return "the most probable class"
    if output_format == "tags":
        return "tags (labels above their thresholds)"
    return (f"P({task.positive_class})" if task.kind == "binary"
            else f"probabilities of {len(task.class_names)} classes")


def trained_on(workdir: str, paths, info: dict) -> int:
    """How many of ``paths`` the run's exported model was trained on, by the run's
    ``split.csv``: its training images, and its validation images too when the model was
    refit on every label (0 when the run folder has no split.csv)."""
    import pandas as pd
    split_csv = os.path.join(workdir, "split.csv")
    if not os.path.isfile(split_csv):
        return 0
    split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    used = split[split.subset.isin(("train", "val") if info.get("refit") else ("train",))]
    seen = {os.path.realpath(p) for p in used.path}
    return sum(os.path.realpath(p) in seen for p in paths)


def _score(cfg: PredictRun, frame, probs, y, task: Task, info: dict, stem: str,
           model: str) -> dict:
    """--labels: the scores of the readable images, the interpretation plots and the
    scoring page. ``model``: what predicted (file and TTA), for every line that scores;
    ``frame.unfamiliar`` (when there): which rows were flagged, scored apart as well."""
    flagged = frame["unfamiliar"].to_numpy(bool) if "unfamiliar" in frame else None
    from small_photo_classifier.workflow.views import interpret
    scores = score_against_labels(frame.name.tolist(), probs, cfg.labels, task,
                                  info.get("thresholds"))
    seen = trained_on(cfg.workdir, frame.path.tolist(), info)
    scores["trained_on_images"] = seen
    images = f"{scores['n']} labelled images of {cfg.data_dir}"
    print(f"{model} on {images}: {format_scores(scores, task)}")
    if flagged is not None:
        scores["unfamiliar_share"] = float(np.mean(flagged)) if len(flagged) else 0.0
        kept = ~np.asarray(flagged, bool)
        if kept.any() and task.kind != "multilabel":
            hit = task.predicted(probs[kept], info.get("thresholds")) == y[kept]
            scores["accuracy_not_flagged"] = float(np.mean(hit))
            print(f"{model}: {int(kept.sum())} of {len(kept)} images not flagged unfamiliar "
                  f"({scores['unfamiliar_share']:.1%} flagged); accuracy on those "
                  f"{scores['accuracy_not_flagged']:.4f}")
    if seen:
        print(f"warning: {model} was trained on {seen} of these {scores['n']} images (the "
              "run's split.csv): this is not a held-out score.")
    plots = interpret.write_all(os.path.dirname(stem), frame.path.tolist(), y, probs, task,
                                f"{model}, {os.path.basename(cfg.labels)}",
                                prefix=os.path.basename(stem) + "_")
    for name, path in plots.items():
        print(f"{name}: {path}")
    if flagged is not None and os.path.isfile(stem + "_unfamiliar.png"):
        plots["most unfamiliar photos"] = stem + "_unfamiliar.png"  # on the page too
    from small_photo_classifier.workflow.views import report
    page = report.write_scoring_report(
        stem, scores, plots, f"{model} of {os.path.abspath(cfg.workdir)} on {images}, "
        f"scored against {cfg.labels}" + (f"; the model was trained on {seen} of them: not "
                                          "a held-out score" if seen else ""))
    print(f"report: {page}")
    return scores
