"""``--augment=auto``: the fine-tuning's augmentation preset chosen by evidence.

Augmentation helps fine-tuning only while the augmented views still look like the
user's photos. What that means depends on the photos: seedlings photographed from
above have no "up", so a quarter turn is another real photo of the class; flowers and
animals do, and a sideways flower is not. The wrong preset costs more than it gives:
on the shared seedling photos a head trained three more epochs on ``aggressive``
views (hue, saturation, 60-degree turns, 35 % zoom) fell from 0.79 to 0.62 top-1 on
held-out photos, while ``top_down`` views kept 0.75 and plain features 0.74
(docs/benchmarks.md, *Fine-tuning's first epoch*). A head trained on plain features
that then meets views unlike them is also what made fine-tuning fall in its first epoch.

The evidence is cheap, from the feature cache: one augmented view per training photo
for each candidate preset (cached, reused by the fine-tuning), and the linear probe
(the heads stage's variant) cross-validated with each preset's views added to its
training folds, always scored on plain photos. The preset whose views help the probe
most on real photos is the one whose views look most like them.
"""

import logging

import numpy as np

from small_photo_classifier.features.choose import probe
from small_photo_classifier.workflow.base import state as state_lib

CANDIDATES = ("keras_blog", "aggressive", "top_down")


def choose(job, cache, batch_size: int, candidates=CANDIDATES) -> tuple:
    """(the chosen preset, the record for metrics.json): each candidate's mean CV score
    of the probe trained on plain + one view per photo of that preset."""
    from small_photo_classifier.workflow.train.job import AUTO_FOLDS, Features
    layer = job.classifier.net.feature_layer
    features = Features(job, cache, batch_size)
    meta = state_lib.load(job.run.path).probe
    config = (probe.ProbeConfig(meta.pooling, meta.standardised, meta.c) if meta
              else probe.ProbeConfig())
    y = job.y_train
    folds = job.folds or job.make_folds(AUTO_FOLDS)
    plain = probe.pooled(features.split()[0][layer], config.pooling)
    table = {}
    for preset in candidates:
        views = probe.pooled(features.of(job.train, 1, preset, (layer,))[layer],
                             config.pooling)
        scores = []
        for tr, va in folds:
            fitted = probe.fit(np.concatenate([plain[tr], views[tr]]),
                               np.concatenate([y[tr], y[tr]]), job.task, config,
                               job.class_weight)
            scores.append(job.task.headline_score(
                y[va], probe.probabilities(fitted, plain[va], job.task)))
        table[preset] = round(float(np.nanmean(scores)), 6)
    chosen = max(candidates, key=lambda p: table[p])  # ties: the earlier, milder preset
    record = {"chosen": chosen, f"cv_{job.task.headline}_by_preset": table,
              "how": f"the linear probe ({config.describe()}) cross-validated on "
                     f"{len(folds)} folds of the {len(y)} training photos with one view of "
                     "each preset per photo added to its training folds, scored on plain "
                     "photos"}
    logging.info("Augmentation for fine-tuning (--augment=auto): %s (probe CV %s with one "
                 "view per photo: %s).", chosen, job.task.headline,
                 ", ".join(f"{p} {s:.4f}" for p, s in table.items()))
    return chosen, record
