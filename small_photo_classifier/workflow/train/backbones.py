"""--stage=backbones and --backbone=auto: which backbone, by evidence.

Each backbone of ``--backbones`` extracts its features once (cached and resumable as
always), then the linear probe and scenario B are cross-validated on the *same*
folds of the training split. A backbone's score is the better of the two (mean CV
score); its out-of-fold predictions are what the choice compares. Cost is measured
on this machine: milliseconds per image through the frozen layers, parameters, and
the size of the saved classifier.

The choice (``--backbone=auto``): the best mean CV score among the candidates that cost
at most `COST_BOUND` times the cheapest one (ties: the cheaper); a candidate beyond
that bound replaces it only when its out-of-fold predictions beat it beyond a paired
bootstrap's noise (the 90% interval of the difference above zero,
`features.choose.evidence`), the rule the default output's other choices follow.
Chosen by evidence (``bench/bench_backbone_choice.py``, docs/benchmarks.md): "the
cheapest unless beaten beyond noise" could not reach a better network that costs about
as much (EfficientNet-Lite2 at 260 px against Lite0: 1.5x the milliseconds, AUC 0.997
against 0.984 by CV on 195 ants/bees photos), because on a few hundred photos a
difference of a percent is rarely beyond noise; within the bound the CV mean decides,
and beyond it (VGG16: 5x Lite0 here) a costlier network must still earn its cost.
"""

import dataclasses
import logging
import os
import tempfile
import time
from typing import List, Optional

import numpy as np
import pandas as pd

from small_photo_classifier.features import backbone, networks
from small_photo_classifier.pipeline.errors import UserError
from small_photo_classifier.features.choose import cv as cv_lib, evidence, probe
from small_photo_classifier.features.fit import heads as heads_lib
from small_photo_classifier.workflow.base.config import TrainConfig
from small_photo_classifier.workflow.views import summary
from small_photo_classifier.workflow.base.outputs import read_json
from small_photo_classifier.workflow.train.job import AUTO_FOLDS, Features, Job, fit_settings

TABLE, PLOT = "backbones.csv", "backbones.png"
# Costs measured here (ms per image) differ by 10-20% between runs; 4x keeps networks of
# one family a size apart in the CV comparison (Lite0 -> Lite2 at 260 px: 1.5x) and
# holds a network of another order of cost (VGG16: 5x Lite0) to the noise test.
COST_BOUND = 4.0
RULE = (f"the best CV score among candidates costing at most {COST_BOUND:g}x the cheapest's "
        "extraction ms per image; a costlier one only when it beats that on out-of-fold "
        "predictions beyond a paired bootstrap's noise (90%)")


@dataclasses.dataclass
class Entry:
    """One candidate's row (a backbone at an input size): scores, cost, and the
    out-of-fold predictions behind them; or why it could not be tried (``failed``)."""
    choice: networks.BackboneChoice
    slug: str
    image_size: int
    score: float = float("nan")
    std: float = float("nan")
    model: str = ""
    ms_per_image: float = float("nan")
    parameters: int = 0
    size_mb: float = float("nan")
    oof: Optional[np.ndarray] = None
    failed: str = ""

    @property
    def label(self) -> str:
        """``name@size`` for people."""
        return f"{self.slug}@{self.image_size}" if self.image_size else self.slug

    def row(self, metric: str) -> dict:
        """The row of backbones.csv."""
        return {"backbone": self.choice.name, "name": self.slug, "image_size": self.image_size,
                f"cv_{metric}_mean": self.score, f"cv_{metric}_std": self.std,
                "scored_by": self.model,
                "extraction_ms_per_image": round(self.ms_per_image, 1),
                "parameters": self.parameters, "model_size_mb": round(self.size_mb, 1),
                "status": f"not tried: {self.failed}" if self.failed else "compared"}


def job_on(job: Job, choice: networks.BackboneChoice) -> Job:
    """``job`` with its classifier rebuilt on another backbone at its own input size
    (`ModelConfig.size_for`; same data, split, folds)."""
    size, why = job.model.size_for(choice)
    model = dataclasses.replace(job.model, backbone=choice, image_size=size,
                                image_size_reason=why,
                                include_top=job.model.include_top and choice.keeps_imagenet_top,
                                weights="imagenet" if choice.is_file else job.model.weights)
    classifier = backbone.build_classifier(model.weights, model.include_top, model.image_size,
                                           job.seed, dropout=model.dropout,
                                           units=job.task.units,
                                           activation=job.task.activation, backbone=choice)
    from small_photo_classifier.features.fit.loop import snapshot
    return dataclasses.replace(job, classifier=classifier, model=model, loaded={}, heads={},
                               initial=snapshot(classifier.model))


def _ms_per_image(job: Job, batch_size: int) -> float:
    """Milliseconds per image through the frozen layers the cache holds, on this machine:
    one batch of the training photos, timed after a warm-up batch. Through the
    extraction's compiled function at its batch size (an eager call of a conv trunk on
    32 images at 260 px held gigabytes: ants/bees auto run, peak 6.8 GB)."""
    from small_photo_classifier.features.store import extract
    from small_photo_classifier.pipeline import input as input_lib
    paths = job.train.path.tolist()[:max(8, min(batch_size, 16))]
    batch = next(iter(input_lib.eval_dataset(paths, None, paths, job.model.image_size,
                                             len(paths))))["image"]
    run = extract.extractor(job.classifier, [job.classifier.net.feature_layer])
    run(batch)
    started = time.perf_counter()
    run(batch)
    return 1000 * (time.perf_counter() - started) / len(paths)


def _size_mb(job: Job) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with backbone.without_training_state(job.classifier.model) as model:
            model.save(path)
        return os.path.getsize(path) / 1e6


def evaluate(job: Job, cfg: TrainConfig) -> Entry:
    """Extracts (or reads) ``job``'s features and cross-validates the probe and B."""
    train, val, _ = Features(job, cfg.cache, cfg.runtime.batch_size).split(0)
    layer = job.classifier.net.feature_layer
    y = job.y_train
    chosen = probe.choose(train[layer], y, job.task, job.probe_folds(), job.seed,
                          job.class_weight)
    config = heads_lib.HeadConfig.for_scenario("B", cfg.heads.learning_rate,
                                               pooling=job.classifier.net.pooling,
                                               optimizer=cfg.heads.optimizer)
    settings = dataclasses.replace(fit_settings(job, cfg.heads, cfg.cache, cfg.runtime),
                                   progress=False)
    head = heads_lib.cross_validate_scenario(job.classifier, config, job.task,
                                             heads_lib.FeatureSplit(train, y, None, job.folds),
                                             settings)
    if head.mean > chosen.mean:
        score, std, model, oof = head.mean, head.std, "scenario B", head.oof_probs
    else:
        score, std, model, oof = chosen.mean, chosen.std, "linear probe", chosen.oof_probs
    return Entry(job.model.backbone, job.classifier.net.slug, job.model.image_size, score, std,
                 model, _ms_per_image(job, cfg.runtime.batch_size),
                 job.classifier.model.count_params(), _size_mb(job), np.asarray(oof))


def choose(entries: List[Entry], job: Job, bound: float = COST_BOUND) -> tuple:
    """(the chosen entry, the comparisons made): the best mean CV score among the
    entries costing at most ``bound`` times the cheapest (ties: the cheaper); then each
    costlier entry, cheapest first, replaces it only when its out-of-fold predictions
    beat it beyond a paired bootstrap's noise."""
    ordered = sorted(entries, key=lambda e: e.ms_per_image)
    limit = bound * ordered[0].ms_per_image
    within = [e for e in ordered if e.ms_per_image <= limit]
    current = max(within, key=lambda e: e.score)  # max keeps the first (cheaper) of ties
    said = [{"candidate": e.slug, "image_size": e.image_size, "baseline": None,
             "within_cost_bound": True, "cv_score": round(float(e.score), 6),
             "chosen_among_these": e is current} for e in within]
    logging.info("Backbones costing at most %gx the cheapest's %.1f ms/image (%s), i.e. at "
                 "most %.1f ms/image: %s; best CV: %s.", bound, ordered[0].ms_per_image,
                 ordered[0].label, limit,
                 ", ".join(f"{e.label} {e.score:.4f}" for e in within), current.label)
    groups = cv_lib.fold_of(job.folds, len(job.y_train))
    for richer in ordered[len(within):]:
        c = evidence.compare(job.task, job.y_train, richer.oof, current.oof, job.seed,
                             groups=groups, clusters=job.train_groups)
        said.append({"candidate": richer.slug, "image_size": richer.image_size,
                     "baseline": current.slug, "within_cost_bound": False,
                     "difference": round(c.difference, 6), "low": round(c.low, 6),
                     "high": round(c.high, 6), "better": bool(c.better)})
        logging.info("Backbone %s (beyond %gx the cheapest's cost) vs %s (out-of-fold, same "
                     "folds): %s %.4f vs %.4f, difference %+.4f (90%% interval %+.4f .. "
                     "%+.4f): %s.", richer.label, bound, current.label, c.metric,
                     c.candidate, c.baseline, c.difference, c.low, c.high,
                     "better beyond noise" if c.better else
                     f"not better beyond noise: keeping {current.label}")
        if c.better:
            current = richer
    return current, said


def _candidates(job: Job, choices) -> tuple:
    """(entries that could not be tried, {choice: job on it}) for every candidate: one
    that cannot be built (a file that is not an image network, a size below its
    minimum, ...) gets one line in the log and a row saying why; the rest go on."""
    failed = [Entry(c, os.path.basename(c.name), size, failed=why)
              for c, size, why in job.failed_backbones]
    jobs = {}
    for choice in choices:
        if any(f.choice == choice for f in failed):
            continue
        try:
            jobs[choice] = job if choice == job.model.backbone else job_on(job, choice)
        except UserError as err:
            size = job.model.size_for(choice)[0]
            logging.warning("Backbone %s at %d px not tried: %s", choice.label, size,
                            " ".join(str(err).split()))
            failed.append(Entry(choice, os.path.basename(choice.name), size, failed=" ".join(
                str(err).split())))
    return failed, jobs


def run(job: Job, cfg: TrainConfig, choices) -> tuple:
    """Evaluates each candidate of ``choices`` (a backbone at its input size), writes
    backbones.csv and backbones.png and the metrics' ``backbones`` key; returns (the
    chosen entry, the job on it)."""
    folds = original_folds = job.folds
    if not folds:
        # Out-of-fold predictions on shared folds are what the comparison is made of, so
        # it has its own folds when the run chooses by a validation set (e.g. 576 photos:
        # 115 validation images, --cv_folds=auto makes none); the rest of the run keeps
        # its validation-set choices.
        folds = job.make_folds(AUTO_FOLDS)
        logging.info("Backbones are compared by %d-fold CV on the training split (the rest "
                     "of the run chooses by the validation set).", AUTO_FOLDS)
        job = dataclasses.replace(job, folds=folds)
    failed, jobs = _candidates(job, choices)
    entries = []
    for choice, other in jobs.items():
        logging.info("Backbone %s at %d px (%s): extracting (or reading) its features and "
                     "cross-validating the probe and scenario B.", other.classifier.net.slug,
                     other.model.image_size, other.model.image_size_reason)
        entries.append(evaluate(other, cfg))
    best, said = choose(entries, job)
    metric = job.task.headline
    table = pd.DataFrame([e.row(metric) for e in entries + failed])
    job.run.write_csv(table, TABLE)
    _plot(entries, best, metric, job.run.file(PLOT))
    section = job.run.update_metrics("backbones", {
        "table": table.to_dict(orient="records"), "chosen": best.choice.name,
        "chosen_name": best.slug, "chosen_size": best.image_size, "comparisons": said,
        "not_tried": [{"backbone": f.choice.label, "why": f.failed} for f in failed],
        "rule": RULE,
        "images": f"out-of-fold predictions on the {len(job.y_train)} training images, "
                  f"{len(job.folds)} folds shared by every backbone"})
    print("\n".join(summary.backbone_lines(section)))
    chosen = dataclasses.replace(jobs[best.choice], folds=original_folds)
    logging.info("Going on with %s at %d px (%s).", chosen.classifier.net.slug,
                 chosen.model.image_size, chosen.model.image_size_reason)
    # run_config.json said what was asked before the choice (the first candidate's size);
    # the rest of the run, the report and predict.py's checks read the choice from it.
    config = job.run.file(cfg.runtime.config_file)
    job.run.write_json({**read_json(config), "image_size": chosen.model.image_size,
                        "image_size_reason": chosen.model.image_size_reason,
                        "backbone_chosen": best.choice.label}, cfg.runtime.config_file)
    return best, chosen


def _plot(entries: List[Entry], best: Entry, metric: str, path: str) -> None:
    from small_photo_classifier.pipeline.atomic import atomic_path
    from small_photo_classifier.workflow.views.plots import pyplot
    plt = pyplot()  # Agg unless the process chose a backend (a notebook's kernel)
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in entries:
        ax.errorbar(e.ms_per_image, e.score, yerr=e.std, fmt="o",
                    color="C1" if e is best else "C0")
        ax.annotate(f"{e.label} ({e.model})" + (" - chosen" if e is best else ""),
                    (e.ms_per_image, e.score), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("extraction ms per image on this machine (log)")
    ax.set_ylabel(f"CV {metric} (mean +- std over folds)")
    ax.set_title("Backbones x input size: score against cost (training split, same folds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
