"""What every exported model records, and the linear probe's export.

Both exports (`workflow.train.export` for a fine-tuned scenario, `export_probe` here for the
probe) write the same things: the final model's report on the validation images
(``final`` in metrics.json, the interpretation plots), the score to expect from the
exported model and how it was measured, ``model_info.json``, the calibration and the
unfamiliar score's reference features.
"""

import os

import numpy as np
import pandas as pd

from small_photo_classifier.features.choose import evidence, probe
from small_photo_classifier.features.serve import inference
from small_photo_classifier.features.store import cache as cache_lib
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.pipeline import groups as groups_lib, run_info
from small_photo_classifier.workflow.views import interpret, summary, trust_views
from small_photo_classifier.workflow.base import state as state_lib
from small_photo_classifier.workflow.train import trusting, validation
from small_photo_classifier.workflow.base.config import (CacheConfig, HeadsConfig, PredictConfig,
                                                         RuntimeConfig)
from small_photo_classifier.workflow.train.job import Features, Job, backbone_weights_id
from small_photo_classifier.workflow.base.outputs import binary_column
from small_photo_classifier.workflow.base import prior as prior_lib

PROBE = "probe"


def final_report(job: Job, probs, model=None):
    """The final model on the validation images: interpretation plots (with ``model``, the
    final model as a Keras model, its top losses' heatmaps too) and, for several classes
    or labels, the per-class report (``classification_report.csv``). Returns the
    per-label thresholds of a multi-label task (chosen here), else None."""
    task = job.task
    thresholds = (task_lib.choose_thresholds(job.y_val, probs) if task.kind == "multilabel"
                  else None)
    interpret.write_all(job.run.path, job.val.path.tolist(), job.y_val, probs, task,
                        "final model, validation",
                        explain=None if model is None else _heatmaps(job, model))
    if len(job.y_val):
        intervals = task_lib.per_class_intervals(task, job.y_val, probs, thresholds, job.seed)
        job.run.update_metrics("per_class", {
            "images": f"the {len(job.y_val)} validation images, predicted by the final model "
                      "before any refit", "interval": "95% bootstrap over the images",
            "classes": intervals.to_dict(orient="records")})
    if task.kind != "binary":
        report = task_lib.per_class_report(task, job.y_val, probs, thresholds)
        job.run.write_csv(report, "classification_report.csv")
        confused = interpret.most_confused(task, job.y_val, probs)
        if confused:
            print("most confused (true -> predicted, validation images): " + "; ".join(
                f"{t} -> {p} ({n})" for t, p, n in confused))
    return thresholds


def _heatmaps(job: Job, model):
    """(paths, class indices) -> each photo's heatmap of that class under ``model``
    (`features.serve.explain`), read as predict.py reads photos."""
    from small_photo_classifier.features.serve import explain
    from small_photo_classifier.pipeline import limits
    from small_photo_classifier.workflow.use import explaining
    parts = explain.parts_of(model)

    def heatmaps(paths, classes):
        images = [explaining.eval_images([explaining.read_photo(p, limits.MAX_PIXELS)],
                                         job.model.image_size) for p in paths]
        return [explain.grad_cam(parts, x, job.task.kind, int(k))[0]
                for x, k in zip(images, classes)]
    return heatmaps


def record_final(job: Job, what: str, scores: dict, thresholds) -> None:
    """metrics.json's ``final``: the final model (before any refit) on the validation
    images, whichever kind it is; it says so itself."""
    job.run.update_metrics("final", {
        "model": what, "images": f"the {len(job.val)} validation images, held out from "
                                 "this model (before any refit)",
        **{f"val_{k}": v for k, v in scores.items()},
        **({"thresholds": [round(float(t), 6) for t in thresholds]}
           if thresholds is not None else {})})


def expected_score(job: Job, probs, how: str, what: str, scores: dict) -> dict:
    """The score to expect from the exported model, and how it was measured: on honest
    predictions of the validation images (``probs``: from a model no choice of which was
    made on the image predicted, ``how`` says why), else (an earlier run folder) the
    final model's validation score, said to be optimistic."""
    name = job.task.headline
    if probs is not None and len(job.y_val):
        value = float(job.task.headline_score(job.y_val, probs))
        return {"metric": name, "value": round(value, 6), "images": len(job.y_val),
                "how": f"{what} before any refit, on {how}"}
    return {"metric": name, "value": scores.get(name), "images": len(job.y_val),
            "how": f"{what} on the {len(job.y_val)} validation images, which also chose its "
                   "epoch (optimistic)"}


def input_contract(image_size: int) -> dict:
    """What an exported model takes, for every backbone (the input graph's output;
    a backbone that wants RGB undoes it inside, `features.zoo.CaffeToRGB`)."""
    return {"shape": [None, image_size, image_size, 3], "dtype": "float32",
            "channel_order": "BGR",
            "value_range": f"0..255, {run_info.INPUT_VALUES}",
            "resize": "bilinear with antialiasing to a square, aspect ratio not kept"}


def model_info(job: Job, scenario: str, blocks, scores: dict, thresholds=None) -> dict:
    """``model_info.json``: what predict.py needs to preprocess as in training, and the
    order and meaning of the model's outputs."""
    task = job.task
    return {"image_size": job.model.image_size, "task": task.kind,
            "class_names": list(task.class_names), "positive_class": task.positive_class,
            "scenario": scenario, "trainable_blocks": blocks,
            "include_top": job.model.include_top,
            "backbone": job.classifier.net.name, "backbone_source": job.classifier.net.source,
            "weights": backbone_weights_id(job.model, job.seed),
            "preprocessing": cache_lib.preprocessing(job.classifier.net),
            "input_contract": job.classifier.net.preprocessing,
            "input": input_contract(job.model.image_size),
            "output": "P(positive class)" if task.kind == "binary" else
            "P(class) per class, in class_names order",
            "val_auc": scores.get("auc"), "val_accuracy": scores.get("accuracy"),
            "layout": job.dataset.layout, "trained_precision": job.precision.policy,
            **({"binary_column": binary_column(task.class_names, job.dataset.sample_submission,
                                               job.dataset.label_column)}
               if task.kind == "binary" else {}),
            **({"thresholds": [float(t) for t in thresholds]} if thresholds is not None else {}),
            **({"prior": prior_lib.record(task, prior_lib.training_shares(
                task, job.frame.label.tolist()), None, "")}
               if task.kind != "multilabel" else {})}


def trust(job: Job, cache: CacheConfig, runtime: RuntimeConfig, trusted: dict, start: str,
           refit: bool) -> dict:
    """metrics.json's ``trust``, the reference features (the images the model trained on);
    returns model_info.json's additions."""
    job.run.update_metrics("trust", trusted["metrics"])
    if not trusted["info"]:
        return {}  # too few held-out images (logged): exported uncalibrated
    frame = pd.concat([job.train, job.val], ignore_index=True) if refit else job.train
    trusting.store_reference(job, cache, frame, start, runtime.batch_size)
    trust_views.write_plots(job.run, trusted["metrics"], job.task.kind)
    return trusted["info"]


def export_probe(job: Job, heads: HeadsConfig, cache: CacheConfig, runtime: RuntimeConfig,
                 predict: PredictConfig, refit: bool, frozen=None) -> None:
    """Exports the probe as the model: the frozen base plus the probe as a Keras head,
    chosen and scored as fitted on the training split, then (with ``refit``) fitted again
    on training + validation images."""
    meta = state_lib.load(job.run.path).probe
    config = probe.ProbeConfig(meta.pooling, meta.standardised, meta.c)
    model, head = _probe_model(job, cache, runtime, config, job.train)
    # The probe sits on the frozen base's cached layer: validated from the cache.
    held = validation.held_out(job, cache, runtime.batch_size)
    layer = job.classifier.net.feature_layer
    scores, probs = validation.validate(job, held, (head, layer))
    thresholds = final_report(job, probs, model)
    choice = {"default": "model", "decisions": {}}
    if predict.tta == "auto":
        _, mirrored = validation.validate(job, held, (head, layer), tta=2)
        tta = evidence.compare(job.task, job.y_val, mirrored, probs, job.seed,
                               clusters=groups_lib.of(job.val))
        choice["decisions"]["tta2_vs_tta1"] = tta.summary()
        choice["tta"] = 2 if tta.better else 1
    else:
        choice["tta"] = int(predict.tta)
    layer = job.classifier.net.feature_layer
    trusted = trusting.fit_held_out(job, cache, runtime.batch_size, PROBE, layer, probs,
                                    predict, oof_ok=True)
    if refit:
        model, _ = _probe_model(job, cache, runtime, config,
                                pd.concat([job.train, job.val], ignore_index=True))
    record_final(job, f"the linear probe ({config.describe()})", scores, thresholds)
    info = {**model_info(job, PROBE, [], scores, thresholds),
            **trust(job, cache, runtime, trusted, layer, refit)}
    estimate = expected_score(job, probs if frozen is None or frozen.probs is None else
                              frozen.probs, frozen.how if frozen is not None and frozen.how
                              else f"the {len(job.y_val)} validation images, which chose "
                              "nothing of the probe", "the linear probe", scores)
    info.update({"default_model": "model", "tta": choice["tta"], "refit": refit,
                 "estimate": estimate, "probe": config.describe()})
    job.run.update_metrics("export", {"default": inference.MODEL_FILE, "model": "probe",
                                      "tta": choice["tta"], "refit": refit,
                                      "estimate": estimate, "decisions": choice["decisions"]})
    state_lib.update(job.run.path, export=state_lib.ExportState(
        inference.MODEL_FILE, int(choice["tta"]), bool(refit), estimate))
    stale = job.run.file(inference.BAG_FILE)
    if os.path.exists(stale):
        os.remove(stale)  # never leave a bag from another run beside this model
    inference.export_model(model, job.run.path, info)
    print(summary.final(job.task, f"the linear probe, {config.describe()}", scores, None, None,
                        len(job.val), estimate, refit))


def _probe_model(job: Job, cache: CacheConfig, runtime: RuntimeConfig,
                 config: probe.ProbeConfig, frame: pd.DataFrame):
    """The probe fitted on ``frame``'s cached features: (image -> frozen base -> probe,
    the probe alone on the backbone's feature map)."""
    import keras
    features = Features(job, cache, runtime.batch_size).of(frame)
    x = probe.pooled(features[job.classifier.net.feature_layer],
                     config.pooling)
    estimator = probe.fit(x, np.asarray(frame.label.tolist()), job.task, config,
                          job.class_weight)
    head = probe.keras_head(estimator, config, job.task,
                            job.classifier.last.output.shape[1:])
    image = keras.Input(job.classifier.model.input.shape[1:], name="image")
    return keras.Model(image, head(job.classifier.last(job.classifier.stem(
        image, training=False), training=False)), name=f"{job.classifier.net.slug}_probe"), head
