"""predict.py's job: load an exported model, predict a folder in order, write the CSV,
and (with labels) score the predictions."""

import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np

from features.task import Task
from pipeline.errors import ConfigError, DataError
from workflow import config as config_lib


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

    @classmethod
    def from_flags(cls, flag_values) -> "PredictRun":
        """Reads and checks predict.py's flags (no TensorFlow needed)."""
        config_lib.parse_tta(flag_values.tta)
        if flag_values.labels and not os.path.exists(flag_values.labels):
            raise DataError(f"--labels={flag_values.labels!r}: no such file or folder.")
        return cls.from_values({name: flag_values[name].value for name in flag_values})


def labels_for(names: Sequence[str], labels_path: str, task: Task) -> np.ndarray:
    """The label of each name, in the order of ``names`` and the encoding of the model's
    ``task``, from a labels CSV or from a tree of class folders."""
    from pipeline import discovery, labels
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
        matrix = sk_metrics.confusion_matrix(y, task.predicted(p), labels=[0, 1])
        result["confusion_matrix"] = {"tn": int(matrix[0, 0]), "fp": int(matrix[0, 1]),
                                      "fn": int(matrix[1, 0]), "tp": int(matrix[1, 1])}
    return result


def format_scores(scores: dict, task: Task = Task("binary", ("0", "1"))) -> str:
    """Human-readable lines for `score_against_labels` output."""
    if task.kind != "binary":
        shown = [k for k in (task.headline, "accuracy", "auc", "top5_accuracy", "f1_micro",
                             "f1_macro", "loss") if k in scores]
        return (", ".join(f"{k} {scores[k]:.4f}" for k in dict.fromkeys(shown))
                + f" on {scores['n']} images")
    text = (f"ROC AUC {scores['auc']:.4f}, accuracy {scores['accuracy']:.4f} on {scores['n']} "
            "images")
    cm = scores.get("confusion_matrix")
    if cm:
        text += (f"\nconfusion matrix (rows: true 0/1, columns: predicted 0/1):\n"
                 f"  {cm['tn']:6d} {cm['fp']:6d}\n  {cm['fn']:6d} {cm['tp']:6d}")
    return text


def write_output(names, probs, cfg: PredictRun, task: Task, thresholds=None) -> str:
    """The prediction CSV in ``--output_format``: probabilities, the top class, or tags."""
    from pipeline import discovery
    from workflow.outputs import submission_column, write_predictions
    sample = os.path.join(cfg.data_dir, discovery.SAMPLE_SUBMISSION_CSV)
    column = submission_column(sample if os.path.isfile(sample) else None)
    if cfg.output_format == "probabilities":
        return write_predictions(names, probs, cfg.output, task.class_names, column)
    if cfg.output_format == "tags":
        if task.kind != "multilabel":
            raise ConfigError("--output_format=tags is for multi-label models; this one is "
                              f"{task.kind} (use label or probabilities).")
        hits = task.predicted(probs, thresholds)
        return write_predictions(names, probs, cfg.output, task.class_names, tags=[
            " ".join(n for n, h in zip(task.class_names, row) if h) for row in hits])
    if task.kind == "multilabel":
        raise ConfigError("--output_format=label gives one class per image; a multi-label "
                          "model's is --output_format=tags.")
    best = task.predicted(probs)
    return write_predictions(names, probs, cfg.output, task.class_names,
                             labels=[task.class_names[int(b)] for b in best])


def run(cfg: PredictRun) -> Optional[dict]:
    """Loads the model, predicts every image in order, writes the CSV (and scores)."""
    from features import inference, precision
    from pipeline import discovery, progress, scan

    from workflow import console
    stem = os.path.splitext(cfg.output)[0]
    console.log_to_file(stem + ".log")  # beside the output: what this prediction did
    chosen = precision.resolve_and_apply(cfg.precision)
    info = inference.read_info(cfg.workdir)
    has_bag = os.path.isfile(os.path.join(cfg.workdir, inference.BAG_FILE))
    wanted = cfg.bag if cfg.bag is not None else info.get("default_model", "bag") == "bag"
    use_bag = wanted and has_bag
    tta = config_lib.parse_tta(cfg.tta)
    tta = int(info.get("tta", 1)) if tta == "auto" else tta
    model, info = inference.load_exported(cfg.workdir, bag=use_bag, policy=chosen.policy)
    task = inference.task_of(info)
    image_size = int(info["image_size"])
    frame = discovery.discover_unlabelled(cfg.data_dir)
    report = os.path.splitext(cfg.output)[0] + "_bad_images.csv"
    frame = scan.filter_bad_images(frame, image_size, cfg.on_bad_image, report, keep_rows=True)
    logging.info("Predicting %d images with %s (%s, %d px, tta=%d, %s).", len(frame),
                 inference.BAG_FILE if use_bag else inference.MODEL_FILE, task.describe(),
                 image_size, tta, chosen.policy)
    progress.report("predict", f"predict again ({cfg.output} is only written once every "
                               "row is done)")
    engine = None
    if cfg.ray_address:
        from features import ray_engine
        engine = ray_engine.RayEngine(cfg.ray_address, cfg.ray_workers,
                                      precision=chosen.policy).start()
    try:
        outputs = inference.predict_frame(model, frame, image_size, cfg.batch_size, tta,
                                          engine=engine, workdir=cfg.workdir, bag=use_bag)
    finally:
        if engine is not None:
            engine.stop()
    probs = task.probabilities(outputs)
    thresholds = info.get("thresholds")
    write_output(frame.name, probs, cfg, task, thresholds)
    used = (f"bag of {info.get('bag', {}).get('members', '?')} models" if use_bag
            else "one model") + f", tta={tta}"
    what = (f"P({task.positive_class})" if task.kind == "binary"
            else f"probabilities of {len(task.class_names)} classes")
    print(f"Wrote {len(frame)} predictions of {what} to {cfg.output} ({used})")
    if not cfg.labels:
        return None
    return _score(cfg, frame, probs, task, thresholds, stem, use_bag, tta)


def _score(cfg: PredictRun, frame, probs, task: Task, thresholds, stem: str, use_bag: bool,
           tta: int) -> dict:
    """--labels: the scores, the interpretation plots and the scoring page."""
    from workflow import interpret
    scores = score_against_labels(frame.name.tolist(), probs, cfg.labels, task, thresholds)
    print(format_scores(scores, task))
    good = ~frame["bad"].to_numpy(bool) if "bad" in frame else np.ones(len(frame), bool)
    y = labels_for(frame.name.tolist(), cfg.labels, task)
    plots = interpret.write_all(os.path.dirname(stem), frame.path[good].tolist(), y[good],
                                probs[good], task, f"{'bag' if use_bag else 'model'}, "
                                f"{os.path.basename(cfg.labels)}",
                                prefix=os.path.basename(stem) + "_")
    for name, path in plots.items():
        print(f"{name}: {path}")
    from workflow import report
    page = report.write_scoring_report(
        stem, scores, plots, f"{'bag.keras' if use_bag else 'model.keras'} of "
        f"{os.path.abspath(cfg.workdir)} (tta={tta}) on {len(frame)} images of {cfg.data_dir}, "
        f"scored against {cfg.labels}")
    print(f"report: {page}")
    return scores
