"""Label efficiency: how many photos to label, which ones next, which labels look wrong.

* `audit` (whenever cross-validation ran): ``suspect_labels.csv`` and
  ``suspect_labels.png`` from the out-of-fold predictions of the chosen model, and
  ``duplicates.csv``: exact duplicates (same bytes) across train / validation /
  test, and near-duplicates across train / validation (pooled-feature cosine
  similarity at or above `NEAR_DUPLICATE` for VGG16, a per-run calibration for other
  backbones: `near_duplicate_threshold`);
* `curve_stage` (``--stage=curve``): ``learning_curve.csv`` and ``learning_curve.png``;
* `label_next_stage` (``--stage=label_next``): ``to_label.csv``, ``to_label.png`` and
  ``labels_template.csv``.
"""

import hashlib
import logging
import os
from typing import Dict

import numpy as np
import pandas as pd

from small_photo_classifier.features import networks
from small_photo_classifier.features.data import audit as audit_lib, curve
from small_photo_classifier.features.choose import cv as cv_lib, probe
from small_photo_classifier.features.fit import heads as heads_lib
from small_photo_classifier.features.data import selection
from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.fit.loop import restore, snapshot
from small_photo_classifier.pipeline import discovery, labels as labels_lib, progress, scan
from small_photo_classifier.pipeline.errors import DataError
from small_photo_classifier.workflow.base import console, state as state_lib
from small_photo_classifier.workflow.views import plots, summary
from small_photo_classifier.workflow.base.config import CacheConfig, HeadsConfig, RuntimeConfig
from small_photo_classifier.workflow.train.job import Features, Job, fit_settings

# Cosine similarity of average-pooled block5_pool features at or above which two photos
# are called near-duplicates. Measured with the ImageNet-derived weights at 224 px
# (bench/bench_label_efficiency.py section 3, docs/benchmarks.md): a photo and its mirror
# scored at least 0.955 (ants/bees) and 0.960 (flowers), a JPEG re-save at least 0.98, a
# 90% centre crop a median of 0.976; two different ants/bees photos at most 0.854, while
# close-ups of one flower species reach 0.94 at the 99.9th percentile. 0.95 catches
# copies, mirrors, re-saves and most crops, and almost no distinct pair.
NEAR_DUPLICATE = networks.VGG16.near_duplicate  # 0.95; other backbones: calibrated per run
GALLERY = 9


def file_digest(path: str) -> str:
    """SHA-1 of a file's bytes (exact duplicates whatever their names)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def audit(job: Job, oof_probs, cache: CacheConfig, runtime: RuntimeConfig, what: str) -> None:
    """Suspect labels from ``oof_probs`` (out-of-fold predictions of the training split by
    ``what``), and duplicates across the splits."""
    table = audit_lib.suspects(job.task, job.y_train, oof_probs,
                               cv_lib.fold_of(job.folds, len(job.train)))
    table.insert(0, "name", job.train.name.to_numpy()[table.row.to_numpy(int)]
                 if len(table) else [])
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    paths = job.train.path.to_numpy()[table.row.to_numpy(int)] if len(table) else []
    table["path"] = list(paths)
    found = {"suspect_labels": len(table), "by": f"{what}, out-of-fold",
             "training_images": len(job.train)}
    if len(table):
        job.run.write_csv(table.drop(columns=["row"]),
                                                         "suspect_labels.csv")
        top = list(range(min(GALLERY, len(table))))
        plots.gallery(list(paths), top, [
            f"labelled {r.label}\nlooks like {r.predicted} ({r.confidence:.2f})"
            for r in table.head(GALLERY).itertuples()], job.run.file("suspect_labels.png"),
            f"Labels that look wrong: the {len(top)} most confident contradictions of "
            f"{len(table)} flagged ({what}, out-of-fold)")
    else:
        # No empty table or empty picture: the summary and the report say "none found".
        _remove(job.run.file("suspect_labels.csv"), job.run.file("suspect_labels.png"))
    logging.info("Suspect labels: %d of %d training images (%s, out-of-fold)%s.",
                 len(table), len(job.train), what,
                 f"; see {job.run.file('suspect_labels.csv')}" if len(table) else "")
    pairs = duplicates(job, cache, runtime)
    found["duplicate_pairs"] = len(pairs)
    found["duplicates_looked_for"] = ("exact copies (same bytes) only: near-duplicates need "
                                      "pretrained features" if _random_weights(job) else
                                      "exact copies and near-duplicates")
    if len(pairs):
        job.run.write_csv(pairs, "duplicates.csv")
        logging.warning("%d duplicate pair(s) across train/validation/test (see %s): "
                        "duplicates across splits inflate every score.", len(pairs),
                        job.run.file("duplicates.csv"))
    else:
        _remove(job.run.file("duplicates.csv"))
    job.run.update_metrics("label_audit", found)
    print(summary.audit_line(found))


def _remove(*paths: str) -> None:
    """Removes files an earlier run in the same folder left (their news is stale)."""
    for path in paths:
        if os.path.isfile(path):
            os.remove(path)


def _random_weights(job: Job) -> bool:
    return str(job.model.weights).lower() == "none"


def duplicates(job: Job, cache: CacheConfig, runtime: RuntimeConfig) -> pd.DataFrame:
    """Exact duplicates across train / validation / test, near-duplicates across train /
    validation."""
    frames = [job.train.assign(subset="train"), job.val.assign(subset="val")]
    if job.dataset.test_dir:
        test = discovery.discover_unlabelled(job.dataset.data_dir)
        frames.append(test.assign(subset="test"))
    everything = pd.concat([f[["name", "path", "subset"]] for f in frames], ignore_index=True)
    digests = everything.path.map(file_digest)
    rows = []
    for _, group in everything.groupby(digests):
        if group.subset.nunique() > 1:
            first = group.iloc[0]
            rows += [{"name_a": first["name"], "subset_a": first.subset, "name_b": r["name"],
                      "subset_b": r.subset, "similarity": 1.0, "kind": "exact"}
                     for _, r in group.iloc[1:].iterrows() if r.subset != first.subset]
    labelled = pd.concat(frames[:2], ignore_index=True)
    if _random_weights(job):
        # Random weights map every photo to nearly the same direction: the threshold,
        # measured on pretrained features, would call every pair a near-duplicate.
        logging.info("Near-duplicates not looked for: they need pretrained features "
                     "(--weights=none); exact duplicates (same bytes) were.")
        return _pairs_table(rows)
    feats = Features(job, cache, runtime.batch_size).of(labelled)
    feats = feats[job.classifier.net.feature_layer]
    pooled = probe.pooled(feats, "average")
    subsets = labelled.assign(subset=["train"] * len(job.train) + ["val"] * len(job.val)).subset
    threshold, how = near_duplicate_threshold(job, runtime.batch_size)
    logging.info("Near-duplicates: average-pooled %s features with cosine similarity >= "
                 "%.3f (%s).", job.classifier.net.feature_layer, threshold, how)
    for a, b, sim in selection.duplicate_pairs(pooled, threshold, subsets.to_numpy()):
        rows.append({"name_a": labelled.name[a], "subset_a": subsets[a],
                     "name_b": labelled.name[b], "subset_b": subsets[b],
                     "similarity": round(sim, 4), "kind": "exact" if sim > 0.9999 else "near"})
    return _pairs_table(rows)


def near_duplicate_threshold(job: Job, batch_size: int = 32, sample: int = 32) -> tuple:
    """(threshold, how it was set). VGG16's was measured (`NEAR_DUPLICATE`); another
    backbone's similarities have their own scale, so the threshold is calibrated on this
    run's photos: the lowest similarity of a photo to its own mirror image, over up to
    ``sample`` training photos. A mirror is a near-duplicate by definition; the
    benchmarks' JPEG re-saves and crops score about as high (docs/benchmarks.md)."""
    net = job.classifier.net
    if net.near_duplicate is not None:
        return net.near_duplicate, f"measured for {net.slug} in docs/benchmarks.md"
    import tensorflow as tf
    from small_photo_classifier.features.store import cache as cache_lib, extract
    from small_photo_classifier.pipeline import input as input_lib
    rng = np.random.default_rng(job.seed)
    paths = job.train.path.to_numpy()[rng.permutation(len(job.train))[:sample]].tolist()
    # The extraction's own compiled function (never an eager call: eagerly, a batch's
    # every activation is held at once, +5 GB for Lite0 and 64 images).
    run = extract.extractor(job.classifier, cache_lib.cached_layers(
        job.classifier.include_top, net))
    sims = []
    for batch in input_lib.eval_dataset(paths, None, paths, job.model.image_size,
                                        max(1, extract.extraction_batch(batch_size) // 2)):
        both = tf.concat([batch["image"], batch["image"][:, :, ::-1]], axis=0)
        pooled = selection.normalised(probe.pooled(np.asarray(run(both)[net.feature_layer]),
                                                   "average"))
        n = len(pooled) // 2
        sims.append(np.sum(pooled[:n] * pooled[n:], axis=1))
    low = float(np.min(np.concatenate(sims)))
    return low, (f"calibrated for {net.slug}: the lowest similarity of {len(paths)} training "
                 "photos to their own mirror images")


def _pairs_table(rows) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=["name_a", "subset_a", "name_b", "subset_b",
                                        "similarity", "kind"])
    return table.drop_duplicates(["name_a", "name_b"]).sort_values(
        "similarity", ascending=False).reset_index(drop=True)


def curve_stage(job: Job, heads: HeadsConfig, cache: CacheConfig, runtime: RuntimeConfig,
                repeats: int = 3) -> Dict[str, curve.Forecast]:
    """The learning curve of the probe and of the best dense head, by CV from the cache."""
    folds = job.folds or job.make_folds(_curve_folds(job))
    train, _, _ = Features(job, cache, runtime.batch_size).split()
    y = job.y_train
    state = state_lib.load(job.run.path)
    config = (probe.ProbeConfig(state.probe.pooling, state.probe.standardised, state.probe.c)
              if state.probe else probe.ProbeConfig("average", False, 0.1))
    x_probe = probe.pooled(train[job.classifier.net.feature_layer], config.pooling)

    def probe_score(tr, va):
        fitted = probe.fit(x_probe[tr], y[tr], job.task, config, job.class_weight)
        return job.task.headline_score(y[va], probe.probabilities(fitted, x_probe[va],
                                                                  job.task))

    scenario = _dense_scenario(state)
    kept = state.heads.get(scenario)
    head = heads_lib.HeadConfig.for_scenario(
        scenario, kept.learning_rate if kept else None, pooling=job.classifier.net.pooling)
    x_head = train[job.classifier.start_layer(head.row.blocks)]
    start = snapshot(job.classifier.model)
    epochs = int(state.heads[scenario].epoch if scenario in state.heads else heads.epochs)

    fit = fit_settings(job, heads, cache, runtime).replace(epochs=epochs)
    # One trainer (compiled once) for every subset, as cross-validation does.
    trainer = head.trainer(job.classifier, job.task)

    def head_score(tr, va):
        restore(job.classifier.model, start)
        trainer.fit(x_head[tr], y[tr], fit, keep=None)
        return job.task.headline_score(y[va], trainer.predict(x_head[va]))

    results, tables = {}, []
    try:
        # Each subset size gives Keras' step another last-batch shape to trace; that is
        # the curve's nature (dozens of sizes), not a leak, so its warning is not shown.
        with console.expected_retracing():
            models = ((f"probe ({config.describe()})", probe_score),
                      (f"scenario {scenario} ({epochs} epochs)", head_score))
            bar = progress.bar(len(models) * curve.fits(folds, repeats=repeats), "fit",
                               "learning curve")
            for name, score in models:
                measured = curve.measure(score, y, folds, job.task, repeats=repeats,
                                         seed=job.seed, progress=bar)
                results[name] = curve.forecast(measured, seed=job.seed)
                tables.append(curve.summary_table(measured, name))
                tables.append(pd.DataFrame(curve.extension_rows(results[name], name)))
    finally:
        trainer.close()
        restore(job.classifier.model, start)
    table = pd.concat(tables, ignore_index=True)
    job.run.write_csv(table, "learning_curve.csv")
    plots.learning_curve(
        table, results, job.run.file("learning_curve.png"), summary.label(job.task.headline))
    _record_curve(job, results)
    return results


def _record_curve(job: Job, results: Dict[str, curve.Forecast]) -> None:
    """metrics.json's ``learning_curve`` and the sentence per model."""
    job.run.update_metrics("learning_curve", {n: {
        "labels": r.labels, "now": r.now, "gain_2x": r.gain_2x, "range_2x": r.range_2x,
        "score_4x": r.score_4x, "range_4x": r.range_4x, "extrapolated": r.supported}
        for n, r in results.items()})
    for name, result in results.items():
        print(result.sentence(summary.label(job.task.headline), name, len(job.train)))


def _curve_folds(job: Job, most: int = 5) -> int:
    """Folds for a curve when the run chose none: up to ``most``, as many as the smallest
    class allows (every fold needs each class in its validation part); an error naming the
    class when it cannot give two."""
    if job.task.kind == "multilabel":
        return min(most, len(job.y_train))
    smallest, count = task_lib.smallest_class(job.task, job.y_train)
    if count < 2:
        raise DataError(f"--stage=curve needs at least 2 training images of every class; class "
                        f"{job.task.class_names[smallest]!r} has {count}.")
    return int(min(most, count))


def _dense_scenario(state: "state_lib.RunState") -> str:
    """The best scenario that trains from block5_pool or above (the curve refits it
    dozens of times; block5's convolutions would take minutes per point)."""
    scores = {s: h.score for s, h in state.heads.items()
              if s in ("A", "B") and h.score is not None}
    return max(scores, key=scores.get) if scores else "B"


def label_next_stage(job: Job, cache: CacheConfig, runtime: RuntimeConfig, folder: str,
                     budget: int, strategy: str, on_bad_image: str) -> pd.DataFrame:
    """Chooses ``budget`` photos of ``folder`` to label next; writes to_label.csv,
    to_label.png and labels_template.csv."""
    pool = _pool(job, folder, on_bad_image)
    if budget >= len(pool):
        print(f"--budget={budget} covers the whole pool of {len(pool)} unlabelled photo(s): "
              "all of them are listed.")
    features = Features(job, cache, runtime.batch_size)
    labelled = pd.concat([job.train, job.val], ignore_index=True)
    x_labelled = probe.pooled(features.of(labelled)[job.classifier.net.feature_layer])
    x_pool = probe.pooled(features.of(pool)[job.classifier.net.feature_layer])
    fitted = probe.fit(x_labelled, np.asarray(labelled.label.tolist()), job.task,
                       probe.ProbeConfig("average", False, 0.1), job.class_weight)
    probs = probe.probabilities(fitted, x_pool, job.task)
    picks = selection.select(strategy, x_pool, probs, budget, x_labelled, seed=job.seed)
    table = pd.DataFrame({"name": [pool.name[r] for r, _, _ in picks],
                          "rank": np.arange(1, len(picks) + 1),
                          "score": [round(s, 4) for _, s, _ in picks],
                          "reason": [why for _, _, why in picks],
                          "path": [pool.path[r] for r, _, _ in picks]})
    job.run.write_csv(table, "to_label.csv")
    plots.gallery(
        [pool.path[r] for r, _, _ in picks], list(range(len(picks))),
        [f"#{i + 1} {why}" for i, (_, _, why) in enumerate(picks)],
        job.run.file("to_label.png"), f"Photos to label next ({strategy}): {len(picks)} of "
        f"{len(pool)}", columns=6)
    template = pd.DataFrame({"name": table.name, _label_column(job): ""})
    if job.dataset.layout == "folders":
        # Class folders have no labels CSV to append to: the label is where the photo
        # lies, so the template says where each photo is now.
        template["path"] = table.path
    job.run.write_csv(template, "labels_template.csv")
    print(f"{len(table)} photo(s) to label next ({strategy}): {job.run.file('to_label.csv')}.")
    if job.dataset.layout == "folders":
        print(f"Label them by moving each photo into its class folder under "
              f"{job.dataset.data_dir} (e.g. mv PHOTO {os.path.join(job.dataset.data_dir, '<class>')}"
              f"/); labels_template.csv lists their paths.")
    else:
        print(f"Fill in the {_label_column(job)} column of "
              f"{job.run.file('labels_template.csv')} and append its rows to "
              f"{os.path.join(job.dataset.data_dir, discovery.LABELS_CSV)}.")
    return table


def _label_column(job: Job) -> str:
    """The label column of the training data's labels CSV, as discovery read it (``tags``
    for one 0/1 column per label, ``label`` for class folders)."""
    if job.dataset.label_column:
        return job.dataset.label_column
    return "tags" if job.task.kind == "multilabel" and job.dataset.layout == "kaggle" \
        else "label"


def _pool(job: Job, folder: str, on_bad_image: str) -> pd.DataFrame:
    """The unlabelled photos, without those already labelled (same bytes) or unusable."""
    if not folder:
        raise DataError("--stage=label_next needs --unlabelled_dir=FOLDER (photos without "
                        "labels) and --budget=N.")
    images, _ = discovery.list_images(folder)
    if not images and not any(os.path.isdir(os.path.join(folder, e)) for e in os.listdir(folder)):
        raise DataError(f"--unlabelled_dir={folder} has no photos to choose from (expected "
                        f"files ending in {', '.join(discovery.IMAGE_EXTENSIONS)}, any case).")
    pool = discovery.discover_unlabelled(folder)
    known = pd.concat([job.train, job.val]).path.map(file_digest)
    digests = pool.path.map(file_digest)
    already = digests.isin(set(known))
    if already.any():
        print(f"{int(already.sum())} photo(s) of {folder} are already labelled (the same "
              f"bytes as a training photo) and are skipped, e.g. "
              f"{labels_lib.listing(pool.name[already].tolist(), 3)}.")
        pool = pool[~already].reset_index(drop=True)
    if pool.empty:
        raise DataError(f"{folder}: every photo is already labelled; nothing to choose from.")
    report = job.run.file("bad_unlabelled_images.csv")
    pool = scan.filter_bad_images(pool, job.model.image_size, on_bad_image, report,
                                  max_pixels=job.max_pixels)
    if pool.empty:
        raise DataError(f"{folder}: no usable photos left (see {report}).")
    return pool.reset_index(drop=True)
