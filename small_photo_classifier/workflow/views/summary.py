"""The plain-text summaries a run prints: scenarios vs the probe, the final model, the
backbones compared."""

from typing import Dict, List, Optional

from small_photo_classifier.features.fit.heads import HeadResult, still_improving
from small_photo_classifier.features.task import Task

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
        limit = (f"; {still_improving(r.epoch_limit)}" if r.at_limit else "")
        if not r.fitted:
            lines.append(f"scenario {s}: {cv[2:]} at epoch {r.best_epoch} (ranked below "
                         f"scenario {best.scenario}, so not fitted on the whole training "
                         f"split; {r.seconds:.1f} s, from {r.start_layer}){limit}")
            continue
        other = "auc" if name == "accuracy" else "accuracy"
        scores = f"{label(name)} {r.val_score:.4f}" + (
            f", {label(other)} {r.val_scores[other]:.3f}" if other in r.val_scores else "")
        lines.append(f"scenario {s}: val {scores} (epoch {r.best_epoch} by {r.selected_by}{cv}; "
                     f"{r.seconds:.1f} s, from {r.start_layer}){limit}")
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
          estimate: dict = None, refit: bool = False) -> str:
    """The final model's lines: which model, on which images, its scores beside the
    probe's and the bag's; the score to expect from the exported model and which photos
    it stands on; and, after a refit, that the exported model trained on every label."""
    name = task.headline
    other = "auc" if name == "accuracy" else "accuracy"
    before = "before the refit " if refit else ""
    text = (f"final model {before}({what}) on the {images} validation images it was not "
            f"trained on: {label(name)} {scores[name]:.4f}, {label(other)} {scores[other]:.4f}"
            + (f"; linear probe {probe_score:.4f}" if probe_score is not None else "")
            + (f"; bag of {bag['members']} {bag[f'val_{name}']:.4f}" if bag else ""))
    if estimate and estimate.get("value") is not None:
        text += (f"\nexpected {label(name)} {estimate['value']:.4f}: {estimate['how']}")
    if refit:
        text += ("\nexported: that model refit on every labelled image (training + "
                 "validation, at the epoch counts chosen above), so it has no held-out "
                 "score of its own")
    return text


def scores_line(task: Task, scores: dict) -> str:
    """``AUC 0.9875, accuracy 0.9000`` (the headline first, then accuracy or AUC)."""
    name = task.headline
    other = "auc" if name == "accuracy" else "accuracy"
    return f"{label(name)} {scores[name]:.4f}" + (
        f", {label(other)} {scores[other]:.4f}" if other in scores else "")


def backbone_lines(metrics: dict) -> Optional[List[str]]:
    """The table, what was not tried, and the choice (which backbone and size, by how
    much over the cheapest, at what cost), for the terminal summary."""
    b = metrics.get("backbones")
    if not b:
        return None
    metric = next(k for k in b["table"][0] if k.startswith("cv_") and k.endswith("_mean"))
    rows = [r for r in b["table"] if r.get("status", "compared") == "compared"]
    lines = [f"backbones ({b['images']}):"]
    for r in rows:
        lines.append(f"  {backbone_label(r):<34} CV {metric[3:-5]} {r[metric]:.4f} +- "
                     f"{r[metric.replace('_mean', '_std')]:.4f} ({r['scored_by']}), "
                     f"{r['extraction_ms_per_image']:.1f} ms/image, "
                     f"{r['parameters'] / 1e6:.1f} M parameters, {r['model_size_mb']:.0f} MB")
    for r in b.get("not_tried", []):
        lines.append(f"  not tried: {r['backbone']} ({r['why']})")
    chosen = next(r for r in rows if r["backbone"] == b["chosen"]
                  and r.get("image_size", b.get("chosen_size")) == b.get("chosen_size"))
    cheapest = min(rows, key=lambda r: r["extraction_ms_per_image"])
    cost = chosen["extraction_ms_per_image"] / max(cheapest["extraction_ms_per_image"], 1e-9)
    versus = ("the cheapest candidate" if chosen is cheapest else
              f"CV {metric[3:-5]} {chosen[metric] - cheapest[metric]:+.4f} over the cheapest, "
              f"{backbone_label(cheapest)}, at {cost:.1f}x its cost")
    lines.append(f"  chosen: {backbone_label(chosen)}, {versus} (rule: {b['rule']})")
    return lines


def backbone_label(row: dict) -> str:
    """A backbones.csv row's ``name@size``."""
    size = row.get("image_size")
    return f"{row['name']}@{size}" if size else row["name"]


def audit_line(found: dict) -> str:
    """The label audit in one line: how many labels look wrong and how many duplicate
    pairs, "none found" when none (no empty file is written then)."""
    suspects = found.get("suspect_labels", 0)
    pairs = found.get("duplicate_pairs", 0)
    return ("Label audit (" + found.get("by", "out-of-fold predictions") + "): "
            + (f"{suspects} of {found.get('training_images', '?')} training labels look "
               "wrong (suspect_labels.csv)" if suspects else
               "labels that look wrong: none found")
            + "; " + (f"{pairs} duplicate pair(s) across the splits (duplicates.csv)" if pairs
                      else "duplicates across the splits: none found")
            + (f" ({found['duplicates_looked_for']})"
               if "only" in found.get("duplicates_looked_for", "") else "") + ".")
