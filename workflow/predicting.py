"""predict.py's job: load an exported model, predict a folder in order, write the CSV,
and (with labels) score the predictions."""

import dataclasses
import logging
import os
from typing import Optional, Sequence

import numpy as np

from features.task import Task
from pipeline.errors import DataError
from workflow import config as config_lib


@dataclasses.dataclass(frozen=True)
class PredictRun(config_lib.Devices):
    """Every setting of one predict.py run."""
    workdir: str = ""
    data_dir: str = ""
    output: str = "submission.csv"
    labels: Optional[str] = None
    bag: bool = True
    tta: int = 1
    on_bad_image: str = "fail"

    @classmethod
    def from_flags(cls, flag_values) -> "PredictRun":
        """Reads and checks predict.py's flags (no TensorFlow needed)."""
        config_lib.check_tta(flag_values.tta)
        return cls.from_values({name: flag_values[name].value for name in flag_values})


def labels_for(names: Sequence[str], labels_csv: str, task: Task) -> np.ndarray:
    """The label of each name from a labels CSV, in the order of ``names``."""
    from pipeline import discovery
    truth = discovery.read_labels_csv(labels_csv)
    by_name = dict(zip(truth.name, truth.label))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"{labels_csv} has no label for {len(missing)} predicted image(s), "
                        f"e.g. {missing[:3]}.")
    y = np.array([by_name[n] for n in names])
    if len(np.unique(y)) < 2:
        raise DataError(f"{labels_csv}: the predicted images are all of one class; ROC AUC "
                        "needs both.")
    return y


def score_against_labels(names: Sequence[str], probs, labels_csv: str,
                         task: Task = Task("binary", ("0", "1"))) -> dict:
    """The task's scores and the confusion matrix against a labels CSV."""
    from sklearn import metrics as sk_metrics
    y = labels_for(names, labels_csv, task)
    p = np.asarray(probs, np.float64)
    result = {**task.scores(y, p), "n": int(len(y))}
    if task.kind == "binary":
        matrix = sk_metrics.confusion_matrix(y, task.predicted(p), labels=[0, 1])
        result["confusion_matrix"] = {"tn": int(matrix[0, 0]), "fp": int(matrix[0, 1]),
                                      "fn": int(matrix[1, 0]), "tp": int(matrix[1, 1])}
    return result


def format_scores(scores: dict) -> str:
    """Human-readable lines for `score_against_labels` output."""
    text = (f"ROC AUC {scores['auc']:.4f}, accuracy {scores['accuracy']:.4f} on {scores['n']} "
            "images")
    cm = scores.get("confusion_matrix")
    if cm:
        text += (f"\nconfusion matrix (rows: true 0/1, columns: predicted 0/1):\n"
                 f"  {cm['tn']:6d} {cm['fp']:6d}\n  {cm['fn']:6d} {cm['tp']:6d}")
    return text


def run(cfg: PredictRun) -> Optional[dict]:
    """Loads the model, predicts every image in order, writes the CSV (and scores)."""
    from features import inference, precision
    from pipeline import discovery, progress, scan
    from workflow import interpret
    from workflow.outputs import write_predictions

    use_bag = cfg.bag and os.path.isfile(os.path.join(cfg.workdir, inference.BAG_FILE))
    chosen = precision.resolve_and_apply(cfg.precision)
    model, info = inference.load_exported(cfg.workdir, bag=use_bag, policy=chosen.policy)
    task = inference.task_of(info)
    image_size = int(info["image_size"])
    frame = discovery.discover_unlabelled(cfg.data_dir)
    report = os.path.splitext(cfg.output)[0] + "_bad_images.csv"
    frame = scan.filter_bad_images(frame, image_size, cfg.on_bad_image, report, keep_rows=True)
    logging.info("Predicting %d images with %s (%s, %d px, tta=%d, %s).", len(frame),
                 inference.BAG_FILE if use_bag else inference.MODEL_FILE, task.describe(),
                 image_size, cfg.tta, chosen.policy)
    progress.report("predict", f"predict again ({cfg.output} is only written once every "
                               "row is done)")
    engine = None
    if cfg.ray_address:
        from features import ray_engine
        engine = ray_engine.RayEngine(cfg.ray_address, cfg.ray_workers,
                                      precision=chosen.policy).start()
    try:
        outputs = inference.predict_frame(model, frame, image_size, cfg.batch_size, cfg.tta,
                                          engine=engine, workdir=cfg.workdir, bag=use_bag)
    finally:
        if engine is not None:
            engine.stop()
    probs = task.probabilities(outputs)
    write_predictions(frame.name, probs, cfg.output, task.class_names)
    used = (f"bag of {info.get('bag', {}).get('members', '?')} models" if use_bag
            else "one model")
    what = (f"P({task.positive_class})" if task.kind == "binary"
            else f"probabilities of {len(task.class_names)} classes")
    print(f"Wrote {len(frame)} predictions of {what} to {cfg.output} ({used})")
    if not cfg.labels:
        return None
    stem = os.path.splitext(cfg.output)[0]
    scores = score_against_labels(frame.name.tolist(), probs, cfg.labels, task)
    print(format_scores(scores))
    good = ~frame["bad"].to_numpy(bool) if "bad" in frame else np.ones(len(frame), bool)
    y = labels_for(frame.name.tolist(), cfg.labels, task)
    plots = interpret.write_all(os.path.dirname(stem), frame.path[good].tolist(), y[good],
                                probs[good], task, f"{'bag' if use_bag else 'model'}, "
                                f"{os.path.basename(cfg.labels)}",
                                prefix=os.path.basename(stem) + "_")
    for name, path in plots.items():
        print(f"{name}: {path}")
    return scores
