"""How well a trained run's unfamiliar score and calibration hold up on photos no training
or choice saw (issue 30).

  python bench/bench_unfamiliar.py --workdir=RUN --known=DIR --unseen=DIR [--far=DIR]

``--known``: held-out photos of the run's classes in class folders (their labels);
``--unseen`` and ``--far``: folders of photos of other things (e.g. other species, and
another kind of photo altogether). Prints, for each signal alone (distance to the
nearest training photos, the calibrated model's uncertainty) and for the stored
combination, the AUROC of telling the unseen photos from the known ones; the share of
known photos flagged; top-1 on the known photos; and the expected calibration error of
the top-class probability before and after the stored calibration. Exactly what
predict.py computes (the same network pass and the same stored maps).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small_photo_classifier.workflow.base import console  # noqa: E402

console.quiet_tensorflow()

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--known", required=True)
    parser.add_argument("--unseen", required=True)
    parser.add_argument("--far", default=None)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score
    from small_photo_classifier.features import trust
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.pipeline import run_info
    from small_photo_classifier.workflow.use import predicting
    from small_photo_classifier.workflow.use import trusted
    info = run_info.read_info(args.workdir)
    task = inference.task_of(info)
    reference = trusted.load_reference(args.workdir, info)
    if reference is None:
        sys.exit(f"{args.workdir} has no unfamiliar score (a run from before issue 30).")
    use_bag = info.get("default_model") == "bag" and os.path.isfile(
        os.path.join(args.workdir, inference.BAG_FILE))
    model, info, units = inference.load_predictor(args.workdir, use_bag, None, True)
    tta = int(info.get("tta", 1))
    sets = {name: _scored(args, (model, info, units, task, reference, tta), folder)
            for name, folder in (("known", args.known), ("unseen", args.unseen),
                                 ("far", args.far)) if folder}
    calibration = trust.Calibration.from_json(info.get("calibration"))
    known = sets["known"]
    y = predicting.labels_for(known["frame"].name.tolist(), args.known, task)
    print(f"Run {os.path.abspath(args.workdir)} ({info.get('backbone')}, "
          f"{info.get('scenario')}, {'bag' if use_bag else 'model.keras'}, tta={tta}); "
          f"known photos {len(y)}, " + ", ".join(f"{k} {len(v['d'])}" for k, v in sets.items()
                                                 if k != "known"))
    print("| signal | " + " | ".join(f"AUROC known vs {k}" for k in sets if k != "known") + " |")
    print("|---|" + "---|" * (len(sets) - 1))
    for label, key in (("distance to the nearest training photos", "d"),
                       ("1 - calibrated top-class probability", "u"),
                       ("unfamiliar_score (the combination)", "score")):
        aurocs = [roc_auc_score(np.r_[np.zeros(len(known[key])), np.ones(len(v[key]))],
                                np.r_[known[key], v[key]]) for k, v in sets.items() if k != "known"]
        print(f"| {label} | " + " | ".join(f"{a:.3f}" for a in aurocs) + " |")
    flagged = {k: float(np.mean(v["flagged"])) for k, v in sets.items()}
    print("flagged unfamiliar: " + ", ".join(f"{k} {v:.1%}" for k, v in flagged.items()))
    top1 = float(np.mean(task.predicted(known["probs"]) == y)) if task.kind != "multilabel" \
        else float("nan")
    print(f"top-1 on the known photos: {top1:.4f}")
    before = trust.metrics(task.kind, y, known["raw"])
    after = trust.metrics(task.kind, y, known["probs"])
    print(f"calibration ({calibration.describe()}) on the known photos: ECE "
          f"{before['ece']:.4f} -> {after['ece']:.4f}, log loss {before['log_loss']:.4f} -> "
          f"{after['log_loss']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f}")


def _scored(args, predictor, folder: str) -> dict:
    """The photos of ``folder`` as predict.py scores them: raw and calibrated
    probabilities, the unfamiliar score and flag, its distance and uncertainty."""
    from small_photo_classifier.features import trust
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.pipeline import discovery, scan
    from small_photo_classifier.workflow.use import trusted
    model, info, units, task, reference, tta = predictor
    fitted = trust.Unfamiliar.from_json(info["unfamiliar"])
    frame = scan.filter_bad_images(discovery.discover_unlabelled(folder),
                                   int(info["image_size"]), "skip", os.devnull, keep_rows=True)
    frame = frame[~frame.bad].reset_index(drop=True)
    out = inference.predict_frame(model, frame, int(info["image_size"]), args.batch_size,
                                  tta, progress=False)
    probs, unf = trusted.apply(task, info, out, units, reference)
    return {"frame": frame, "raw": task.probabilities(out[:, :units]), "probs": probs,
            "score": unf["score"], "flagged": unf["flagged"],
            "d": trust.distance(reference, out[:, units:], fitted.k),
            "u": trust.uncertainty(task.kind, probs)}


if __name__ == "__main__":
    main()
