"""The run report: one self-contained HTML page a person can open, print or mail.

``report.html`` in the run folder (train.py) and ``<output>_report.html`` beside a
scored prediction (predict.py --labels). Plots are embedded as base64 PNG, there is
no script and nothing is fetched, so the page opens anywhere. Every number on it is
read from the run's JSON (``metrics.json``, or the scoring's ``<output>_metrics.json``)
and carries its place there, ``data-metric="heads/A/cv_auc_mean"``, so a test can
check the page against the file it came from.
"""

import json
import os
import time
from typing import Dict, List, Optional

import pandas as pd

from small_photo_classifier.workflow.base.outputs import read_json
from small_photo_classifier.workflow.views import decisions, export_views, summary, trust_views
from small_photo_classifier.workflow.views.html import esc, image, number, page, table

REPORT = "report.html"
# Flags whose value is a place on this machine, not a setting worth reporting, and the
# task, which run_config.json records as detected (the header shows it).
_PLACES = {"data_dir", "workdir", "cache_dir", "task"}
def write(path: str, text: str) -> str:
    from small_photo_classifier.pipeline.atomic import atomic_write_text
    atomic_write_text(path, text)
    return path


def _data_section(folder: str) -> str:
    split_csv = os.path.join(folder, "split.csv")
    if not os.path.isfile(split_csv):
        return ""
    split = pd.read_csv(split_csv, dtype={"name": str, "label": str})
    counts = split.groupby(["label", "subset"]).size().unstack(fill_value=0)
    rows = [[esc(label), *[f'<span class="n">{int(counts.loc[label].get(s, 0))}</span>'
                           for s in ("train", "val")], str(int(counts.loc[label].sum()))]
            for label in counts.index]
    out = "<h2>Data</h2>" + table(["class", "training", "validation", "all"], rows)
    groups = read_json(os.path.join(folder, "metrics.json")).get("groups")
    if groups:
        out += (f"<p>Groups: {groups['groups']} groups of photos from "
                f"{esc(groups['source'])} (the largest, {esc(groups['largest_name'])}, has "
                f"{groups['largest']} photos); each stays on one side of every split and "
                "fold (split.csv: group, fold).</p>")
    else:
        out += ("<p>Groups: none named (--groups, --group_pattern): photos were split one "
                "by one, so near-copies of one subject can be on both sides.</p>")
    bad_csv = os.path.join(folder, "bad_images.csv")
    if os.path.isfile(bad_csv):
        bad = pd.read_csv(bad_csv)
        names = ", ".join(esc(os.path.basename(str(p))) for p in bad.iloc[:20, 0])
        out += (f"<p>{len(bad)} image(s) skipped as undecodable (bad_images.csv)"
                f"{': ' + names if len(bad) else ''}{' …' if len(bad) > 20 else ''}.</p>")
    return out


def changed_settings(run_config: dict) -> List[tuple]:
    """(flag, value, default) for every train.py flag whose value differs from its
    default (the defaults are read from the flag definitions themselves)."""
    from absl import flags
    from small_photo_classifier.workflow.base import flags as flag_defs
    values = flags.FlagValues()
    flag_defs.define_train(values)
    out = []
    aliases = {f.name for f in values.get_flags_for_module(flag_defs.ALIASES)}
    for name in sorted(values):
        if name in _PLACES or name in aliases or name not in run_config:
            continue
        if name == "image_size" and run_config.get("image_size_reason", "--image_size") \
                != "--image_size":
            continue  # the backbone's own size, not a setting: said below the table

        default, value = values[name].default, run_config[name]
        if isinstance(default, list) and isinstance(value, list):
            same = [str(v) for v in default] == [str(v) for v in value]
        else:
            same = default == value or str(default) == str(value)
        if not same:
            out.append((name, value, default))
    return out


def as_flag(name: str, value) -> str:
    """A setting as it is typed on the command line: ``--noinclude_top``, ``--scenarios=A,B``;
    an unset flag is ``(unset)``."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if value is None:
        return "(unset)"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"--{name}={value}"


def _settings_section(folder: str, name: str = "run_config.json",
                      title: str = "Settings that differ from the defaults") -> str:
    run_config = read_json(os.path.join(folder, name))
    if not run_config:
        return ""
    rows = [[f"<code>{esc(as_flag(n, v))}</code>", f"<code>{esc(as_flag(n, d))}</code>"]
            for n, v, d in changed_settings(run_config)]
    precision = run_config.get("precision_resolved", {}).get("policy")
    text = (f"<h2>{esc(title)}</h2>" +
            (table(["this run", "default"], rows) if rows else
             "<p>None: every flag at its default.</p>"))
    if precision:
        text += f"<p class=\"note\">Computed in {esc(precision)}.</p>"
    if run_config.get("image_size_reason"):
        text += (f"<p class=\"note\">Input size {esc(run_config.get('image_size'))} px: "
                 f"{esc(run_config['image_size_reason'])}.</p>")
    if name == "run_config.json":
        no_effect = read_json(os.path.join(folder, "metrics.json")).get("no_effect", {})
        if no_effect:
            text += ("<p>Flags that had no effect on this run:</p><ul>" + "".join(
                f"<li><code>{esc(flag)}</code>: {esc(why)}.</li>"
                for flag, why in no_effect.items()) + "</ul>")
    return text


def _models_section(folder: str, metrics: dict, metric: str) -> str:
    heads = metrics.get("heads", {})
    probe = metrics.get("probe", {})
    if not heads and not probe:
        return ""
    rows = []
    if probe:
        rows.append(["linear probe", number(metrics, f"probe/cv_{metric}_mean"),
                     number(metrics, f"probe/cv_{metric}_std"),
                     number(metrics, f"probe/val_{metric}"), "–", "–"])
    for s in sorted(heads):
        rows.append([f"scenario {esc(s)}", number(metrics, f"heads/{s}/cv_{metric}_mean"),
                     number(metrics, f"heads/{s}/cv_{metric}_std"),
                     number(metrics, f"heads/{s}/best_val_{metric}"),
                     number(metrics, f"heads/{s}/epoch"),
                     number(metrics, f"heads/{s}/seconds", 1)])
    choice = metrics.get("heads_choice", {})
    why = "".join(
        f"<p class=\"note\">Scenario {esc(s)}: still improving at the last epoch "
        f"({esc(heads[s].get('epochs_allowed'))}): raise --epochs.</p>"
        for s in sorted(heads) if heads[s].get("still_improving_at_limit"))
    if choice:
        why += (f"<p>Chosen: <b>{esc(choice.get('scenario'))}</b> (by "
                f"{esc(choice.get('by', '?'))}).</p>")
        versus = choice.get("probe_vs_head")
        if versus:
            # Named for the images compared on: out-of-fold predictions with CV, else the
            # validation images (which also chose the scenario).
            on = versus.get("on", "out-of-fold").split(",")[0]
            why += decisions.table(f"best scenario vs the linear probe ({on})", "probe_vs_head",
                             versus, "heads_choice/probe_vs_head", metrics)
    return (f"<h2>Probe and heads on cached features ({esc(metric)})</h2>" +
            table(["model", f"CV {metric} mean", "± std", f"validation {metric}", "epoch",
                   "seconds"], rows) + why +
            image(os.path.join(folder, "heads_comparison.png"),
                  "Scenarios per epoch (cross-validation mean and, for the scenario fitted, "
                  "validation) and the probe" if metrics.get("cross_validation") else
                  "Scenarios per epoch on the validation images, and the probe"))


def _finetune_section(folder: str, metrics: dict) -> str:
    ft = metrics.get("finetune", {})
    if not ft or "best_epoch" not in ft:
        return ""
    kept, monitor = ft.get("best_epoch"), str(ft.get("monitor", ""))
    words = ("Fine-tuning did not improve on the head: the starting head (epoch 0) was "
             "exported." if kept == 0 else f"Kept epoch {kept} of {ft.get('epochs_run')}.")
    if ft.get("still_improving_at_limit"):
        words += (f" Still improving at the last epoch ({ft.get('epochs_allowed')}): raise "
                  "--finetune_epochs.")
    return ("<h2>Fine-tuning</h2>"
            f"<p>Scenario {esc(ft.get('scenario'))}, blocks {esc(','.join(ft.get('blocks', [])))}"
            f". {esc(words)} {esc(monitor)}: starting head "
            f"{number(metrics, 'finetune/start_' + monitor)}, best "
            f"{number(metrics, 'finetune/best_' + monitor)}; "
            f"{number(metrics, 'finetune/seconds', 1)} s.</p>" +
            image(os.path.join(folder, "finetune_history.png"),
                  "Fine-tuning history (epoch 0 = the starting head; the kept epoch circled)"))


def _final_section(folder: str, metrics: dict) -> str:
    final = metrics.get("final", {})
    if not final:
        return ""
    rows = [[esc(k[4:]), number(metrics, f"final/{k}")] for k in sorted(final)
            if k.startswith("val_") and isinstance(final[k], (int, float))]
    refit = metrics.get("export", {}).get("refit")
    title = ("The final model before the refit, on the validation images it was not trained "
             "on" if refit else "The final model on the validation images")
    note = ("<p class=\"note\">The exported model was then refit on every labelled image, "
            "these too: it has no held-out score of its own; its expected score is in "
            "<i>The exported model and why</i>.</p>" if refit else "")
    per_class = metrics.get("per_class", {})
    if per_class.get("classes"):
        def cell(row, m):
            return (f"{row[m]:.3f} ({row[m + '_low']:.3f}–{row[m + '_high']:.3f})")
        note += (f"<p>Per class, on {esc(per_class.get('images'))}; in brackets the "
                 f"{esc(per_class.get('interval'))}:</p>" + table(
                     ["class", "precision", "recall", "F1", "support"],
                     [[esc(r["class"]), cell(r, "precision"), cell(r, "recall"), cell(r, "f1"),
                       esc(r["support"])] for r in per_class["classes"]]))
    return (f"<h2>{esc(title)}</h2>" + note + table(["metric", "value"], rows)
            + "".join(image(os.path.join(folder, f), c) for f, c in (
                ("confusion_matrix.png", "Confusion matrix"), ("roc.png", "ROC"),
                ("top_losses.png", "Top losses"),
                ("top_losses_heatmaps.png", "Top losses: where the model looked for the "
                                            "class it gave (Grad-CAM)"))))


def _labels_section(folder: str, metrics: dict) -> str:
    """The label audit: what it found, or that it found none (no empty file is written)."""
    found = metrics.get("label_audit")
    if not found:
        return ""
    suspects, pairs = found.get("suspect_labels", 0), found.get("duplicate_pairs", 0)
    parts = [f"<p>Suspect labels ({esc(found.get('by', 'out-of-fold predictions'))}): "
             + (f"{suspects} of {found.get('training_images', '?')} training labels look "
                "wrong (suspect_labels.csv).</p>" if suspects else "none found.</p>")]
    if suspects:
        parts.append(image(os.path.join(folder, "suspect_labels.png"), "Labels that look wrong"))
    parts.append("<p>Duplicates across the splits ("
                 + esc(found.get("duplicates_looked_for", "exact and near")) + "): "
                 + (f"{pairs} pair(s) (duplicates.csv).</p>" if pairs else "none found.</p>"))
    return "<h2>Labels</h2>" + "".join(parts)


# The training stages in the order they run (metrics.json sorts its keys).
def _timings_section(metrics: dict) -> str:
    """Seconds and peak memory of each stage, in the order they ran, the whole run last
    (a run folder from before peak memory was recorded shows a dash there)."""
    timings = metrics.get("timings", {})
    if not timings:
        return ""
    ran = metrics.get("stage_order", [])  # metrics.json sorts its keys: this is the run's
    order = sorted(timings, key=lambda k: (k == "total", ran.index(k) if k in ran else len(ran)))
    what = metrics.get("peak_memory_is", "")
    return ("<h2>Time and peak memory per stage (training)</h2>"
            + (f"<p>Peak memory: {esc(what)} (resident set, MB).</p>" if what else "")
            + table(["stage", "seconds", "peak memory (MB)"], [
                [esc(k), number(metrics, f"timings/{k}", 1),
                 number(metrics, f"peak_memory_mb/{k}", 0)] for k in order]))


def _later_sections(folder: str, metrics: dict) -> List[str]:
    """One section per later stage run on this folder (label next, learning curve): what
    it found, its settings and its time, beside (never instead of) the training's."""
    out = []
    stages = metrics.get("stages", {})
    if "label_next" in stages:
        picks = os.path.join(folder, "to_label.csv")
        rows = []
        if os.path.isfile(picks):
            shown = pd.read_csv(picks, dtype={"name": str}).head(12)
            rows = [[str(r["rank"]), esc(r["name"]), esc(r["reason"])]
                    for _, r in shown.iterrows()]
        out.append(
            "<h2>Photos to label next (--stage=label_next)</h2>"
            f"<p>{number(metrics, 'stages/label_next/picked', 0)} photo(s) of "
            f"{esc(stages['label_next'].get('unlabelled_dir', '?'))} picked by "
            f"{esc(stages['label_next'].get('strategy', '?'))} (to_label.csv, "
            "labels_template.csv); the first 12:</p>"
            + table(["rank", "name", "why"], rows)
            + image(os.path.join(folder, "to_label.png"), "Photos to label next")
            + _settings_section(folder, "run_config_label_next.json",
                                "Settings of --stage=label_next that differ from the defaults")
            + f"<p class=\"note\">{number(metrics, 'stages/label_next/seconds', 1)} s.</p>")
    curve = os.path.join(folder, "learning_curve.png")
    if os.path.isfile(curve):
        out.append("<h2>Learning curve (--stage=curve)</h2>"
                   + image(curve, "Learning curve (cross-validated on the training split)")
                   + (f"<p class=\"note\">{number(metrics, 'stages/curve/seconds', 1)} s.</p>"
                      if "curve" in stages else ""))
    return out


def _backbones_section(folder: str, metrics: dict) -> str:
    """--stage=backbones / --backbone=auto: every candidate (backbone x input size), the
    comparisons, the choice (by how much, at what cost) and what was not tried."""
    b = metrics.get("backbones")
    if not b or not b.get("table"):
        return ""
    mean = next(k for k in b["table"][0] if k.startswith("cv_") and k.endswith("_mean"))
    rows = []
    for i, r in enumerate(b["table"]):
        tried = r.get("status", "compared") == "compared"
        at = f"backbones/table/{i}/"
        rows.append([esc(summary.backbone_label(r)), number(metrics, at + mean) if tried else "–",
                     number(metrics, at + mean.replace("_mean", "_std")) if tried else "–",
                     esc(r["scored_by"]) if tried else esc(r.get("status", "")),
                     number(metrics, at + "extraction_ms_per_image", 1) if tried else "–",
                     f"{r['parameters'] / 1e6:.1f} M" if tried else "–",
                     number(metrics, at + "model_size_mb", 1) if tried else "–"])
    said = "".join(_comparison(c) for c in b.get("comparisons", []))
    chosen = (summary.backbone_lines(metrics) or [""])[-1].strip()
    return ("<h2>Backbones (--stage=backbones, --backbone=auto)</h2>"
            f"<p>{esc(b['images'])}. {esc(chosen[0].upper() + chosen[1:])}.</p>"
            + table(["backbone @ input size", f"CV {esc(mean[3:-5])} mean", "± std",
                     "scored by (or why not tried)", "extraction ms/image", "parameters",
                     "model MB"], rows)
            + (f"<ul>{said}</ul>" if said else "")
            + image(os.path.join(folder, "backbones.png"), "Score against cost"))


def _comparison(c: dict) -> str:
    """One step of the backbone choice, as a list item."""
    name = esc(c["candidate"]) + (f"@{c['image_size']}" if c.get("image_size") else "")
    if c.get("within_cost_bound"):
        return (f"<li>{name}: within the cost bound, CV {c['cv_score']:.4f}"
                f"{' (the best of these)' if c['chosen_among_these'] else ''}</li>")
    return (f"<li>{name} (beyond the cost bound) vs {esc(c['baseline'])}: difference "
            f"{c['difference']:+.4f} (90% interval {c['low']:+.4f} .. {c['high']:+.4f}): "
            f"{'better beyond noise' if c['better'] else 'not better beyond noise'}</li>")


def _commands_section(commands: Dict[str, str]) -> str:
    if not commands:
        return ""
    return "<h2>Commands</h2>" + "".join(f"<p>{esc(what)}:</p><pre>{esc(c)}</pre>"
                                         for what, c in commands.items())


def write_run_report(folder: str, commands: Optional[Dict[str, str]] = None) -> str:
    """Writes ``<folder>/report.html`` from the run folder's files; returns its path.
    ``commands`` are added to those the training stages stored (run_state.json)."""
    from small_photo_classifier.workflow.base import state as state_lib
    commands = {**state_lib.load(folder).report_commands, **(commands or {})}
    metrics = read_json(os.path.join(folder, "metrics.json"))
    info = read_json(os.path.join(folder, "model_info.json"))
    metric = (metrics.get("export", {}).get("estimate", {}).get("metric")
              or {"binary": "auc", "multiclass": "accuracy", "multilabel": "map"}.get(
                  info.get("task", {}).get("kind") if isinstance(info.get("task"), dict)
                  else info.get("task"), "auc"))
    run_config = read_json(os.path.join(folder, "run_config.json"))
    header = (f"<p>Data {esc(run_config.get('data_dir', '?'))}: a {esc(run_config.get('task', '?'))}"
              f" task.</p><p class=\"note\">Run folder {esc(os.path.abspath(folder))}, written "
              f"{esc(time.strftime('%Y-%m-%d %H:%M'))}. Every number comes from metrics.json."
              "</p>")
    return write(os.path.join(folder, REPORT), page("Training report", [
        header, _data_section(folder), _settings_section(folder),
        _backbones_section(folder, metrics), _models_section(folder, metrics, metric),
        decisions.whole_section(folder, metrics), _finetune_section(folder, metrics),
        decisions.export_section(metrics), export_views.report_section(metrics),
        _final_section(folder, metrics),
        trust_views.report_section(folder, metrics), _labels_section(folder, metrics),
        _timings_section(metrics), *_later_sections(folder, metrics),
        _commands_section(commands or {})]))


def write_scoring_report(stem: str, scores: dict, plots: Dict[str, str], what: str) -> str:
    """predict.py --labels: ``<stem>_metrics.json`` (the scores) and ``<stem>_report.html``
    (the scores and the plots); returns the page's path."""
    from small_photo_classifier.workflow.base.outputs import write_json
    metrics_path = write_json(stem + "_metrics.json", {"scores": scores, "model": what})
    metrics = json.loads(open(metrics_path, encoding="utf-8").read())
    rows = [[esc(k), number(metrics, f"scores/{k}")] for k in sorted(scores)
            if isinstance(scores[k], (int, float))]
    return write(stem + "_report.html", page("Scoring report", [
        f"<p class=\"note\">{esc(what)}. Every number comes from "
        f"{esc(os.path.basename(metrics_path))}.</p>",
        "<h2>Scores</h2>" + table(["metric", "value"], rows),
        "<h2>Plots</h2>" + "".join(image(p, n) for n, p in plots.items())]))
