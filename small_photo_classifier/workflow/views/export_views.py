"""report.html's deployment formats (train.py --export, export.py): each file, its size,
how far it is from predict.py's numbers and its speed, from metrics.json's ``exports``."""

from small_photo_classifier.workflow.views.html import esc, number, table


def report_section(metrics: dict) -> str:
    """The deployment formats (--export, export.py): each file checked against
    predict.py in a fresh process, or why it failed."""
    exports = metrics.get("exports", {})
    formats = {k: v for k, v in exports.items() if isinstance(v, dict)}
    if not formats:
        return ""
    rows = []
    for key, r in formats.items():
        if "error" in r:
            rows.append([esc(key), "failed: no file kept", esc(r["error"]), "", "", ""])
            continue
        rows.append([esc(key), esc(r.get("file")), f"{r.get('bytes', 0) / 1e6:.1f} MB",
                     number(metrics, f"exports/{key}/max_abs_dp", 2),
                     number(metrics, f"exports/{key}/max_abs_d_unfamiliar", 2)
                     if "max_abs_d_unfamiliar" in r else "–",
                     number(metrics, f"exports/{key}/ms_per_image", 1)])
    return ("<h2>Deployment formats</h2>"
            f"<p>Each checked against predict.py (model.keras, one view) on "
            f"{esc(exports.get('checked_on', '?'))}.</p>"
            + table(["format", "file", "size", "max |dP| vs predict.py",
                     "max |d unfamiliar_score|", "ms / image (CPU)"], rows))
