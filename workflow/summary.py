"""The plain-text summaries a run prints: scenarios vs the probe, the final model."""

from typing import Dict

from features.fit.heads import HeadResult
from features.task import Task

LABELS = {"auc": "AUC", "accuracy": "accuracy", "map": "mAP", "loss": "loss"}


def label(metric: str) -> str:
    """``auc`` -> ``AUC`` for people."""
    return LABELS.get(metric, metric)


def heads(results: Dict[str, HeadResult], probe: dict, best: HeadResult, task: Task) -> str:
    """The heads stage's summary: each scenario, the probe, and who wins."""
    name = task.headline
    lines = []
    for s, r in results.items():
        cv = (f", {r.cv.curves.shape[0]}-fold CV {label(name)} {r.cv.mean:.4f} +- "
              f"{r.cv.std:.4f}" if r.cv else "")
        if not r.fitted:
            lines.append(f"scenario {s}: {cv[2:]} at epoch {r.best_epoch} (ranked below "
                         f"scenario {best.scenario}, so not fitted on the whole training "
                         f"split; {r.seconds:.1f} s, from {r.start_layer})")
            continue
        other = "auc" if name == "accuracy" else "accuracy"
        scores = f"{label(name)} {r.val_score:.4f}" + (
            f", {label(other)} {r.val_scores[other]:.3f}" if other in r.val_scores else "")
        lines.append(f"scenario {s}: val {scores} (epoch {r.best_epoch} by {r.selected_by}{cv}; "
                     f"{r.seconds:.1f} s, from {r.start_layer})")
    cv = (f", CV {label(name)} {probe[f'cv_{name}_mean']:.4f} +- {probe[f'cv_{name}_std']:.4f}"
          if f"cv_{name}_mean" in probe else "")
    other = "auc" if name == "accuracy" else "accuracy"
    lines.append(f"linear probe (baseline): val {label(name)} {probe[f'val_{name}']:.4f}"
                 + (f", {label(other)} {probe[f'val_{other}']:.3f}"
                    if f"val_{other}" in probe else "") + cv)
    probe_score = (probe.get(f"cv_{name}_mean", probe[f"val_{name}"]) if best.cv
                   else probe[f"val_{name}"])
    what = f"CV {label(name)}" if best.cv else f"val {label(name)}"
    verdict = "beats" if best.score > probe_score else "does NOT beat"
    lines.append(f"best scenario {best.scenario} {verdict} the probe: {what} {best.score:.4f} "
                 f"vs {probe_score:.4f}")
    return "\n".join(lines)


def final(task: Task, what: str, scores: dict, probe_score, bag, images: int,
          estimate: dict = None) -> str:
    """The final model's lines: which model, on which images, its scores beside the
    probe's and the bag's; with ``estimate`` (a refit), what was exported instead and the
    score to expect from it (it has no held-out images of its own)."""
    name = task.headline
    other = "auc" if name == "accuracy" else "accuracy"
    before = "before the refit " if estimate else ""
    text = (f"final model {before}({what}) on the {images} validation images it was not "
            f"trained on: {label(name)} {scores[name]:.4f}, {label(other)} {scores[other]:.4f}"
            + (f"; linear probe {probe_score:.4f}" if probe_score is not None else "")
            + (f"; bag of {bag['members']} {bag[f'val_{name}']:.4f}" if bag else ""))
    if estimate:
        std = estimate.get("std")
        text += (f"\nexported: that model refit on every labelled image (the validation images "
                 f"too, so it has no held-out score); expected {label(name)} "
                 f"{estimate['value']:.4f}" + (f" +- {std:.4f}" if std is not None else "")
                 + f" from {estimate['how'].split(' (')[0]}")
    return text


def scores_line(task: Task, scores: dict) -> str:
    """``AUC 0.9875, accuracy 0.9000`` (the headline first, then accuracy or AUC)."""
    name = task.headline
    other = "auc" if name == "accuracy" else "accuracy"
    return f"{label(name)} {scores[name]:.4f}" + (
        f", {label(other)} {scores[other]:.4f}" if other in scores else "")
