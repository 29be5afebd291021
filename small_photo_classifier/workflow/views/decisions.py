"""report.html's decisions: what was kept and why, each with the paired bootstrap's
evidence (`features.choose.evidence`) as metrics.json records it."""

import os

from small_photo_classifier.workflow.views.html import esc, image, number
from small_photo_classifier.workflow.views.html import table as html_table

# (baseline, candidate) of each decision metrics.json records.
_SIDES = {"bag_vs_single": ("single model", "bag"), "tta2_vs_tta1": ("1 view", "2 views")}


def table(title: str, name: str, data: dict, key: str, metrics: dict) -> str:
    """One evidence decision: both scores, the paired bootstrap's interval, and what was
    kept, named (the baseline unless the candidate won beyond noise)."""
    verdict = data.get("candidate_better_beyond_noise")
    baseline, candidate = _SIDES.get(name, (data.get("baseline_is", "baseline"),
                                            data.get("candidate_is", "candidate")))
    kept = data.get("kept") or (candidate if verdict else baseline)
    words = (f"{candidate} better beyond noise: {kept} kept" if verdict else
             f"{candidate} not better beyond noise: {kept} kept")
    if data.get("verdict_only"):  # one of two metrics: what was kept is said below both
        words = "better beyond noise" if verdict else "not better beyond noise"
    return html_table(["decision", f"baseline ({esc(baseline)})",
                       f"candidate ({esc(candidate)})", "difference", "90% interval",
                       "images", "verdict"], [[
                      esc(title), number(metrics, f"{key}/baseline"),
                      number(metrics, f"{key}/candidate"),
                      number(metrics, f"{key}/difference"),
                      esc(" .. ".join(f"{v:+.4f}" for v in data.get("ci90", []))),
                      number(metrics, f"{key}/images", 0), esc(words)]])


def _sides(decision: dict) -> dict:
    """The names of a decision's two sides, for a second metric's table."""
    return {k: decision[k] for k in ("baseline_is", "candidate_is") if k in decision}


def export_section(metrics: dict) -> str:
    export = metrics.get("export", {})
    if not export:
        return ""
    out = ["<h2>The exported model and why</h2>",
           f"<p>Exported: <b>{esc(metrics.get('final', {}).get('model', export.get('model')))}"
           f"</b>; default file {esc(export.get('default'))}, test-time views "
           f"{number(metrics, 'export/tta', 0)}, refit on every label: "
           f"{esc('yes' if export.get('refit') else 'no')}.</p>"]
    estimate = export.get("estimate", {})
    if estimate:
        spread = (f" ± {number(metrics, 'export/estimate/std')}"
                  if estimate.get("std") is not None else "")
        out.append(f"<p>Expected {esc(estimate.get('metric'))}: "
                   f"{number(metrics, 'export/estimate/value')}{spread} "
                   f"({esc(estimate.get('how'))}).</p>")
    for name, data in export.get("decisions", {}).items():
        title = {"bag_vs_single": "bag vs single model",
                 "tta2_vs_tta1": "2 test-time views vs 1"}.get(name, name)
        out.append(table(title, name, data, f"export/decisions/{name}", metrics))
    measured = metrics.get("bag", {}).get("measured_with")
    if measured and export.get("refit"):
        out.append(f"<p class=\"note\">The bag was measured with {esc(measured)}.</p>")
    return "".join(out)


def whole_section(folder: str, metrics: dict) -> str:
    """Whether the whole network was fine-tuned, why (not), and the evidence that kept
    it or the frozen model; the augmentation preset and why."""
    whole, augment = metrics.get("whole_network"), metrics.get("augment")
    if not whole and not augment:
        return ""
    out = ["<h2>Whole-network fine-tuning</h2>"]
    if whole:
        out.append(f"<p>{esc('Tried' if whole.get('tried') else 'Not tried')}: "
                   f"{esc(whole.get('why', ''))}.</p>")
        decision = whole.get("decision")
        if decision:
            seconds = number(metrics, "whole_network/seconds", 1)
            out.append(f"<p>From {esc(whole.get('start'))}; kept epoch "
                       f"{esc(whole.get('kept_epoch'))}; {seconds} s. Compared on "
                       f"{esc(decision.get('on'))}:</p>")
            two = bool(decision.get("loss"))
            out.append(table("whole network vs the frozen-feature model", "whole",
                             {**decision, "verdict_only": two}, "whole_network/decision",
                             metrics))
            if two:
                out.append(table("the same, on the log loss (lower is better)", "whole",
                                 {**decision["loss"], **_sides(decision),
                                  "verdict_only": True}, "whole_network/decision/loss",
                                 metrics))
            kept = decision.get("whole_network_kept",
                                decision.get("candidate_better_beyond_noise"))
            if decision.get("why"):
                out.append(f"<p>Kept: <b>{esc(decision.get('kept'))}</b> "
                           f"({esc(decision['why'])}).</p>")
            if not kept and not metrics.get("finetune", {}).get("scenario") == "whole":
                out.append(image(os.path.join(folder, "finetune_history.png"),
                                 "The whole network's epochs (not exported; epoch 0 = the "
                                 "head it started from)"))
    if augment:
        table_ = augment.get(next((k for k in augment if k.endswith("_by_preset")), ""), {})
        out.append(f"<p>Augmentation: <b>{esc(augment.get('chosen'))}</b>, by "
                   f"{esc(augment.get('how'))}: " + ", ".join(
                       f"{esc(p)} {v:.4f}" for p, v in table_.items()) + ".</p>")
    return "".join(out)
