"""The heads stage's choice between its best scenario and the linear probe, and the
sentence that says what was decided (in words that match the comparison made)."""

import dataclasses
import logging
import os
from typing import Optional

import numpy as np

from small_photo_classifier.features.choose import cv as cv_lib, evidence, honest
from small_photo_classifier.pipeline import groups as groups_lib
from small_photo_classifier.pipeline.atomic import atomic_path
from small_photo_classifier.workflow.train.final_model import PROBE
from small_photo_classifier.workflow.train.job import Job

# The heads stage's chosen model on the validation images, honestly predicted: what the
# final stage compares other candidates with and takes its estimate from.
HELD_OUT_FILE = os.path.join("heads", "heldout.npz")


def choice_sentence(choice: dict, best: str) -> str:
    """What the heads stage decided, in words that match the comparison it made: the
    difference is always the scenario's score minus the probe's, and the verdict names
    the better model whenever one is better beyond noise, whichever was the baseline."""
    versus = choice.get("probe_vs_head")
    if choice.get("by") == "--use_sweep":
        return f"scenario {best} (the sweep's best configuration) will be fine-tuned and exported"
    if not versus:
        return (f"scenario {best} will be fine-tuned and exported (without cross-validation "
                "it was not compared with the probe)")
    sign = 1 if versus["candidate_is"] == f"scenario {best}" else -1
    low, high = sorted(sign * v for v in versus["ci90"])
    diff = (f"scenario {best} minus the probe {sign * versus['difference']:+.4f}, 90% "
            f"interval {low:+.4f} .. {high:+.4f}")
    exported = ("the probe will be exported" if choice["scenario"] == PROBE else
                f"scenario {best} will be fine-tuned and exported")
    if low > 0:
        return f"scenario {best} beats the linear probe beyond noise ({diff}): {exported}"
    if high < 0:
        return f"the linear probe beats scenario {best} beyond noise ({diff}): {exported}"
    kept = "the probe, the simpler model," if choice["scenario"] == PROBE else f"scenario {best}"
    why = ("" if choice["scenario"] == PROBE else
           " (without cross-validation the scenario is the baseline)"
           if versus["on"].startswith("the validation images") else " (--noprobe_baseline)")
    return (f"neither scenario {best} nor the linear probe is better beyond noise ({diff}): "
            f"{kept} is kept as the baseline{why}; {exported}")


def probe_or_head(job: Job, best, probe_choice, baseline: dict,
                   probe_baseline: bool = True, probe_val=None) -> dict:
    """The heads stage's choice between the best scenario and the linear probe, on
    out-of-fold predictions (with CV), else on the validation images (``probe_val``: the
    probe's probabilities there). With CV the simpler model is the baseline: the probe
    stays unless the scenario beats it beyond noise (``probe_baseline``; False: the
    scenario is the baseline and the probe must beat it). Without CV the scenario is
    always the baseline: the validation images already chose it and its epoch, so the
    probe replaces it only when clearly better there (measured: docs/benchmarks.md)."""
    choice = {"scenario": best.scenario, "by": best.selected_by, "score": best.score,
              "metric": job.task.headline}
    if best.cv is not None and probe_choice.oof_probs is not None:
        y, head, lin = job.y_train, best.cv.oof_probs, probe_choice.oof_probs
        where = "out-of-fold predictions of the training split, fold by fold"
        groups, score = cv_lib.fold_of(job.folds, len(y)), f"cv_{job.task.headline}_mean"
        clusters = groups_lib.of(job.train)
    elif best.val_probs is not None and probe_val is not None and len(job.y_val):
        y, head, lin = job.y_val, best.val_probs, probe_val
        where = "the validation images, which also chose the scenario and its epoch"
        groups, score = None, f"val_{job.task.headline}"
        clusters = groups_lib.of(job.val)
        probe_baseline = False
    else:
        choice["probe_vs_head"] = None
        return choice
    name = f"scenario {best.scenario}"
    if probe_baseline:
        comparison = evidence.compare(job.task, y, head, lin, job.seed, groups=groups,
                                      clusters=clusters)
        logging.info("Scenario %s vs the probe (%s): %s", best.scenario, where,
                     comparison.describe(name, "the linear probe"))
        use_probe = not comparison.better
        candidate, kept = (name, "the linear probe") if use_probe else (name, name)
    else:
        comparison = evidence.compare(job.task, y, lin, head, job.seed, groups=groups,
                                      clusters=clusters)
        logging.info("Probe vs scenario %s (%s): %s", best.scenario, where,
                     comparison.describe("the linear probe", name))
        use_probe = comparison.better
        candidate, kept = "the linear probe", ("the linear probe" if use_probe else name)
    choice["probe_vs_head"] = {**comparison.summary(), "on": where, "candidate_is": candidate,
                               "baseline_is": "the linear probe" if probe_baseline else name,
                               "kept": kept}
    if use_probe:
        choice.update({"scenario": PROBE, "score": baseline.get(score),
                       "by": ("out-of-fold" if groups is not None else "validation-image")
                       + " comparison with the best scenario"})
    return choice


@dataclasses.dataclass(frozen=True)
class Honest:
    """A model's predictions of the validation images that no choice of its own made on
    them (``how`` says why), and its name."""
    probs: Optional[np.ndarray]
    what: str
    how: str


def honest_val(job: Job, choice: dict, results: dict, probe_val) -> Honest:
    """The chosen frozen-feature model's honest validation predictions: the probe's and
    a cross-validated scenario's as they are (their settings and epochs were chosen on
    the training split), a scenario chosen by the validation images cross-fitted over
    its epochs (`features.choose.honest`)."""
    n = len(job.y_val)
    if choice["scenario"] == PROBE:
        return Honest(probe_val, "the linear probe",
                      f"the {n} validation images, which chose nothing of the probe (its "
                      "settings were chosen by cross-validation on the training split)")
    r = results[choice["scenario"]]
    what = f"scenario {choice['scenario']}"
    if r.cv is not None or not r.epoch_probs:
        return Honest(r.val_probs, what, f"the {n} validation images, which chose nothing of "
                      "it (its epoch was chosen by cross-validation on the training split)")
    probs, _ = honest.cross_fit(job.task, job.y_val, r.epoch_probs, job.seed,
                                groups=groups_lib.of(job.val))
    return Honest(probs, what, f"the {n} validation images, each predicted at the epoch "
                  "chosen on the other validation images")


def save_honest(job: Job, h: Honest) -> None:
    path = job.run.file(HELD_OUT_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, probs=np.asarray(h.probs, np.float64), what=np.array(h.what),
                     how=np.array(h.how), names=np.array(job.val.name.astype(str).tolist()))


def load_honest(job: Job, scenario: str) -> Honest:
    """What `save_honest` stored for ``scenario`` (the heads stage's choice), or, from a
    run folder without it (another choice, an earlier version), none."""
    what = "the linear probe" if scenario == PROBE else f"scenario {scenario}"
    path = job.run.file(HELD_OUT_FILE)
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as z:
            if str(z["what"]) == what and list(z["names"]) == job.val.name.astype(
                    str).tolist():
                return Honest(z["probs"], what, str(z["how"]))
    return Honest(None, what, "")
