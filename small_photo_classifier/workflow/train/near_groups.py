"""Near-duplicate photos joined into groups, when the user named none.

Copies, mirrors, re-saves and crops of one photo (the label audit's near-duplicates:
average-pooled feature maps at or above the backbone's cosine threshold) are joined
into one group, transitively, and the split and folds are made again with every group
on one side (`pipeline.groups`). It runs in every stage, before anything trains, from
the same cached features, so ``--stage=finetune`` or ``--stage=curve`` later finds the
same split. It needs pretrained features (random weights call every pair a copy), and
it gives way to ``--groups``/``--group_pattern``.
"""

import dataclasses
import logging

import numpy as np

from small_photo_classifier.features import task as task_lib
from small_photo_classifier.features.choose import probe
from small_photo_classifier.features.data import selection
from small_photo_classifier.pipeline import groups as groups_lib
from small_photo_classifier.pipeline.errors import ConfigError
from small_photo_classifier.workflow.base.config import TrainConfig
from small_photo_classifier.workflow.train import job as job_lib, labelling
from small_photo_classifier.workflow.train.job import Features, Job


def wanted(job: Job, cfg: TrainConfig) -> bool:
    """Whether to look: not with groups named by the user, random weights or
    --nonear_duplicate_groups."""
    return (cfg.data.near_duplicate_groups and groups_lib.of(job.frame) is None
            and str(job.model.weights).lower() != "none")


def regroup(job: Job, cfg: TrainConfig) -> Job:
    """``job`` with its photos' near-duplicates grouped and the split and folds made
    again around them, or ``job`` unchanged (see `wanted`, or no near-duplicates)."""
    if not wanted(job, cfg):
        return job
    net = job.classifier.net
    feats = Features(job, cfg.cache, cfg.runtime.batch_size).of(job.frame)[net.feature_layer]
    threshold, how = labelling.near_duplicate_threshold(job, cfg.runtime.batch_size)
    pairs = selection.duplicate_pairs(probe.pooled(feats, "average"), threshold)
    if not pairs:
        logging.info("Near-duplicate groups: none found (cosine similarity >= %.3f, %s): "
                     "photos are split one by one.", threshold, how)
        return job
    frame = job.frame.assign(**{groups_lib.COLUMN: _components(job.frame.name.to_numpy(str),
                                                               pairs)})
    counts = frame[groups_lib.COLUMN].value_counts()
    summary = groups_lib.Summary(
        f"near-duplicate photos (average-pooled {net.feature_layer}, cosine >= "
        f"{threshold:.3f}: {how})", int(len(counts)), int(len(frame)), int(counts.iloc[0]),
        str(counts.index[0]))
    try:
        parts = job_lib.resplit(cfg.data, cfg.heads, job, frame, summary)
    except ConfigError as err:
        logging.warning("Near-duplicate groups: %d groups, the largest of %d of the %d "
                        "photos, cannot all be kept whole (%s) The photos are split one by "
                        "one; name the groups with --groups or --group_pattern.",
                        summary.groups, summary.largest, summary.photos, err)
        return job
    weights = task_lib.class_weights(job.task, job_lib.labels_of(job.task, parts.train),
                                     cfg.heads.class_weight)
    return dataclasses.replace(job, frame=parts.frame, train=parts.train, val=parts.val,
                               folds=parts.folds, class_weight=weights)


def _components(names: np.ndarray, pairs) -> list:
    """Each photo's group: the connected components of the near-duplicate pairs (union
    find), named by their first photo in name order; a photo with no near-duplicate is
    its own group."""
    parent = list(range(len(names)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    order = np.argsort(names, kind="stable")
    first = {}
    for i in order:
        first.setdefault(root(i), names[i])
    return [first[root(i)] for i in range(len(names))]
