"""Whole-network fine-tuning: a candidate the run trains and keeps only by evidence.

Frozen ImageNet features are the ceiling of every model the heads stage compares
(the probe, scenarios A-C): on photos far from ImageNet's (seedlings from above on
soil, leaf diseases, microscopy) that ceiling is low. This candidate trains every
stage of a light backbone: the head first (on the cached features, as the heads
stage did), then all layers end to end from the photos at the backbone's own size,
with a warm-up and a cosine decay, batch-norm statistics frozen, and epochs by
evidence (the validation score, with patience).

It is compared with the frozen-feature model the heads stage chose on *honest*
predictions of the validation images: those of an epoch chosen on the other
validation images (`features.choose.honest`), so neither side is scored on the
images that chose it; it replaces the frozen model only when it is better beyond a
paired bootstrap's noise.

When it is tried (`plan`): a light backbone (at most `LIGHT_PARAMETERS` in its conv
base: EfficientNet-Lite, MobileNet, EfficientNetV2-B0), unless a model that got half
of the validation photos right where the frozen model has them (fixing about half of
its errors there) could not beat it beyond noise: then no plausible gain of the whole
network could be shown on these photos, and its minutes are not spent (frozen features
are near the top: ants and bees, flowers12; measured in docs/benchmarks.md);
``--whole_network=yes`` asks for it on any backbone, ``no`` never.
"""

import dataclasses
import logging
from typing import Optional

import numpy as np

from small_photo_classifier.features.choose import evidence
from small_photo_classifier.pipeline import groups as groups_lib

LIGHT_PARAMETERS = 10e6


@dataclasses.dataclass(frozen=True)
class Plan:
    """Whether whole-network fine-tuning is tried, and why (one sentence)."""
    tried: bool
    why: str


def perfect(task, y) -> np.ndarray:
    """The probabilities of a model right on every image, with full confidence."""
    y = np.asarray(y)
    if task.kind == "multiclass":
        return np.eye(len(task.class_names))[y.astype(int)]
    return y.astype(np.float64)


def halfway(task, y, probs, seed: int = 0) -> np.ndarray:
    """A model halfway to perfect: right with full confidence on a random half of the
    images, the same as ``probs`` on the others (so about half of their errors fixed)."""
    out = np.array(probs, np.float64, copy=True)
    rows = np.random.default_rng(seed).permutation(len(out))[:len(out) // 2]
    out[rows] = perfect(task, np.asarray(y))[rows]
    return out


def plan(job, mode: str, frozen_probs, frozen_what: str) -> Plan:
    """Whether this run tries whole-network fine-tuning (``mode``: auto, yes, no), given
    the frozen model's honest validation predictions."""
    if mode == "no":
        return Plan(False, "--whole_network=no")
    net = job.classifier
    params = sum(int(np.prod(w.shape)) for w in (*net.stem.weights, *net.last.weights))
    if mode == "yes":
        return Plan(True, "--whole_network=yes")
    if params > LIGHT_PARAMETERS:
        return Plan(False, f"{net.net.slug}'s conv base has {params / 1e6:.1f} M parameters: "
                           "whole-network fine-tuning is tried by default only on light "
                           f"backbones (at most {LIGHT_PARAMETERS / 1e6:.0f} M: EfficientNet-"
                           "Lite, MobileNet, EfficientNetV2-B0); --whole_network=yes asks "
                           "for it")
    y = job.y_val
    if frozen_probs is None or len(y) == 0:
        return Plan(False, "no validation images to compare it on")
    half = halfway(job.task, y, frozen_probs, job.seed)
    gain = evidence.compare(job.task, y, half, frozen_probs, job.seed,
                            clusters=groups_lib.of(job.val))
    score = gain.baseline
    if not gain.better:
        return Plan(False, f"{frozen_what} already scores {job.task.headline} {score:.4f} on "
                           f"the {len(y)} validation photos: even a model that fixed about "
                           "half of its errors there could not beat it beyond noise, so "
                           "whole-network fine-tuning could hardly be chosen "
                           "(--whole_network=yes tries it)")
    return Plan(True, f"{frozen_what} scores {job.task.headline} {score:.4f} on the {len(y)} "
                      "validation photos: a model that fixed about half of its errors "
                      "there would be better beyond noise")


def log_plan(p: Plan) -> None:
    logging.info("Whole-network fine-tuning %s: %s.", "tried" if p.tried else "not tried",
                 p.why)


def choose(job, frozen_probs, whole_probs, frozen_what: str) -> dict:
    """The frozen model (the baseline) against the whole-network fine-tuned one on the
    same honest validation predictions; the record metrics.json keeps.

    The whole network is kept when it is better beyond noise on the headline metric, or
    on the log loss while its headline score is at least the frozen model's. On a few
    dozen validation photos accuracy moves in steps of one photo: seedlings' 73 gave
    +0.055 with a 90 % interval from +0.000, while the log loss, which counts how sure
    each model was of each photo's true class, tells the two apart on those photos."""
    clusters = groups_lib.of(job.val)
    head = evidence.compare(job.task, job.y_val, whole_probs, frozen_probs, job.seed,
                            clusters=clusters)
    loss = evidence.compare(job.task, job.y_val, whole_probs, frozen_probs, job.seed,
                            clusters=clusters, metric="loss")
    by_loss = loss.better and head.difference >= 0
    kept = head.better or by_loss
    for c in (head, loss):
        logging.info("Whole-network fine-tuning vs %s: %s", frozen_what,
                     c.describe("the whole network fine-tuned", frozen_what))
    why = ("better beyond noise on " + job.task.headline if head.better else
           f"better beyond noise on the log loss, and {job.task.headline} "
           f"{head.candidate:.4f} against {head.baseline:.4f}" if by_loss else
           f"better beyond noise on neither {job.task.headline} nor the log loss"
           if head.difference >= 0 else f"{job.task.headline} lower")
    return {**head.summary(), "loss": loss.summary(),
            "candidate_is": "the whole network, fine-tuned", "baseline_is": frozen_what,
            "whole_network_kept": kept, "why": why,
            "kept": "the whole network, fine-tuned" if kept else frozen_what,
            "on": f"honest predictions of the {len(job.y_val)} validation images (each from "
                  "an epoch chosen on the other validation images)"}


def settings(job, config, heads, runtime):
    """How the whole network trains: `FinetuneSettings` of the fine-tuning flags, with the
    whole network's own epochs, learning rate and batch size."""
    from small_photo_classifier.workflow.train.job import finetune_settings
    # The epoch by the validation loss unless --monitor says otherwise: on a few dozen
    # validation photos the accuracy jumps between epochs (seedlings: 0.75-0.88 while
    # the loss fell steadily), and the early, lucky epoch it picks is one whose learning
    # rate was still high.
    return finetune_settings(job, config, heads, runtime, "adam").replace(
        epochs=config.whole_epochs, learning_rate=config.whole_learning_rate,
        batch_size=min(runtime.batch_size, config.whole_batch_size),
        patience=config.whole_patience, monitor=config.monitor or "loss")


def start_scenario(job, chosen: str) -> Optional[str]:
    """The scenario whose cache-trained head the whole network starts from: the chosen
    one when the heads stage chose a scenario, else the best one by its score."""
    from small_photo_classifier.workflow.base import state as state_lib
    heads = state_lib.load(job.run.path).heads
    if chosen in heads:
        return chosen
    scored = {s: h.score for s, h in heads.items() if h.score is not None}
    return max(scored, key=scored.get) if scored else None
