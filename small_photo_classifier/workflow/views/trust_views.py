"""The calibration, threshold and unfamiliar score as people see them: the reliability
diagram, the histogram of held-out scores, and report.html's section (every number of
the run from metrics.json's ``trust``; the benchmark's catch rates said as measured on
other photos)."""

import os


# What the flag catches was measured on the shared photos, not on this run's: said as
# such (docs/benchmarks.md, "Calibration and unfamiliar photos"; 2026-12-03/07).
MEASURED_ELSEWHERE = (
    "What the flag catches, measured on other photos (docs/benchmarks.md), not this run's: "
    "a 6-flower-species model flagged 73% (VGG16) / 57% (EfficientNet-Lite0) of 6 unseen "
    "flower species and 80% / 98% of ants/bees photos; an ants/bees model flagged only 5% / "
    "26% of flower photos (bees are photographed on flowers: to that model they look like "
    "its training photos). It catches photos unlike all the training photos and species "
    "between known ones, not every other kind of photo.")


def write_plots(run, report: dict, task_kind: str) -> None:
    """``reliability.png`` (before and after calibration, on the held-out predictions) and
    ``unfamiliar_scores.png`` (the held-out known photos' scores and the threshold)."""
    from small_photo_classifier.workflow.views import plots
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    lo = 0.0 if task_kind == "multiclass" else 0.5
    for ax, key, title in ((axes[0], "reliability_before", "before"),
                           (axes[1], "reliability_after", "after (fitted on these)")):
        table = report[key]
        shown = [(c, a, n) for c, a, n in zip(table["confidence"], table["accuracy"],
                                              table["count"]) if n]
        ax.plot([lo, 1], [lo, 1], "k:", lw=1, label="perfect calibration")
        ax.plot([c for c, _, _ in shown], [a for _, a, _ in shown], "o-", label="held-out")
        for c, a, n in shown:
            ax.annotate(str(n), (c, a), fontsize=7, xytext=(3, -9), textcoords="offset points")
        m = report["before" if key.endswith("before") else "after_cross_fitted"]
        ax.set_title(f"Calibration {title}: ECE {m['ece']:.3f}", fontsize=10)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(lo, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Reliability on {report['held_out']}", fontsize=9)
    plots.save(fig, run.file("reliability.png"))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    scores, threshold = report["unfamiliar_scores"], report["unfamiliar"]["threshold"]
    ax.hist(scores, bins=30, color="#4477aa")
    ax.axvline(threshold, color="#cc3311", label=f"threshold {threshold:.2f} (flags "
               f"{report['unfamiliar']['rate']:.0%})")
    ax.set_xlabel("unfamiliar_score")
    ax.set_ylabel("held-out photos of the known classes")
    ax.legend(fontsize=8)
    ax.set_title("Unfamiliar scores of held-out known photos", fontsize=10)
    plots.save(fig, run.file("unfamiliar_scores.png"))


def report_section(folder: str, metrics: dict) -> str:
    """report.html's part on calibration, the threshold and the unfamiliar score (every
    number from metrics.json's ``trust``)."""
    from small_photo_classifier.workflow.views.html import esc, image, number, table
    data = metrics.get("trust")
    if not data:
        return ""
    if "skipped" in data:
        return ("<h2>Calibration, threshold and unfamiliar photos</h2>"
                f"<p>Not fitted: {esc(data['skipped'])}.</p>")
    rows = [[esc(k), number(metrics, f"trust/before/{k}"),
             number(metrics, f"trust/after_cross_fitted/{k}")] for k in ("log_loss", "brier",
                                                                         "ece")]
    cal = data["calibration"]
    kind = {"platt": "Platt scaling, slope " + number(metrics, "trust/calibration/slope", 3)
                     + ", bias " + number(metrics, "trust/calibration/bias", 3),
            "temperature": "temperature scaling, T = " + ", ".join(
                number(metrics, f"trust/calibration/temperature/{i}", 3)
                for i in range(len(cal.get("temperature", []))))}.get(
        cal["kind"], "none (the model's own probabilities)")
    out = ["<h2>Calibration, threshold and unfamiliar photos</h2>",
           f"<p>Calibration: {kind}, on {esc(cal.get('fitted_on') or data['held_out'])}. "
           "The 'after' column is cross-fitted (each image's map fitted on the others), so "
           "it is not measured on the images the map was fitted on. Ranking metrics (AUC, "
           "top-1) do not change.</p>",
           table(["metric", "before", "after"], rows),
           image(os.path.join(folder, "reliability.png"), "Reliability diagram")]
    threshold = data.get("threshold")
    if threshold:
        t = "trust/threshold/"
        values = ", ".join(number(metrics, f"{t}values/{i}", 3)
                           for i in range(len(threshold["values"])))
        out.append(f"<p>Threshold rule {esc(threshold['rule'])}: {values} on the calibrated "
                   f"probability; expected precision {number(metrics, t + 'precision', 3)} "
                   f"(95% interval {number(metrics, t + 'precision_interval/0', 3)} .. "
                   f"{number(metrics, t + 'precision_interval/1', 3)}), recall "
                   f"{number(metrics, t + 'recall', 3)} ("
                   f"{number(metrics, t + 'recall_interval/0', 3)} .. "
                   f"{number(metrics, t + 'recall_interval/1', 3)}), from the same held-out "
                   "predictions.</p>")
    u = "trust/unfamiliar/"
    out.append(f"<p>Unfamiliar score: {number(metrics, u + 'distance_weight', 1)} z(log "
               f"cosine distance to the k-th nearest training photo, k = "
               f"{number(metrics, u + 'k')}) + "
               f"z(log uncertainty); threshold {number(metrics, u + 'threshold', 3)} flags "
               f"a share {number(metrics, u + 'rate', 2)} of the "
               f"{number(metrics, u + 'held_out_images')} held-out known photos.</p>")
    out.append(f"<p class=\"note\">{MEASURED_ELSEWHERE}</p>")
    out.append(image(os.path.join(folder, "unfamiliar_scores.png"),
                     "Unfamiliar scores of held-out known photos"))
    return "".join(out)
