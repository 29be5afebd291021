"""Every figure the tool draws, and the one way they are saved (atomically, PNG).

Training curves (a history, scenarios side by side, the sweep), and what a
practitioner looks at after the numbers: the confusion matrix, the ROC curve
(scikit-learn's displays) and the top losses, the images the model gets most
wrong, often mislabelled photos or a systematic blind spot.
"""

import os
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd

from small_photo_classifier.pipeline.atomic import atomic_path

FILES = ("confusion_matrix.png", "roc.png", "top_losses.png")


def pyplot():
    """pyplot, on the file-only Agg backend unless the process already chose one: a
    notebook's kernel names its inline backend (MPLBACKEND), and a user's pyplot keeps
    its backend, so their own figures still show after a run (every figure here is
    written to a file and closed, never shown)."""
    import os
    import sys
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str) -> str:
    """Writes ``fig`` to ``path`` atomically and closes it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)
    return path


def curves(histories: Dict[str, pd.DataFrame], path: str,
           metrics_to_plot=("val_accuracy", "val_auc"), title: str = "",
           reference: Optional[dict] = None, marks: Optional[dict] = None) -> str:
    """One panel per metric, one line per run (e.g. scenario), against epoch.

    ``reference`` maps a metric to (value, label): a dashed horizontal line, e.g.
    the linear probe's validation AUC. ``marks`` maps a run to an epoch to circle
    (e.g. the kept one).
    """
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics_to_plot), figsize=(5 * len(metrics_to_plot), 3.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics_to_plot):
        for label, frame in histories.items():
            if metric in frame and frame[metric].notna().any():
                line, = ax.plot(frame.epoch, frame[metric], marker="o", label=str(label))
                kept = (marks or {}).get(label)
                if kept is not None and (frame.epoch == kept).any():
                    value = frame.loc[frame.epoch == kept, metric].iloc[0]
                    ax.plot([kept], [value], marker="o", markersize=14, fillstyle="none",
                            color=line.get_color(), label=f"{label}: chosen epoch {kept}")
        if reference and metric in reference and np.isfinite(reference[metric][0]):
            value, label = reference[metric]
            ax.axhline(value, color="grey", linestyle="--", label=f"{label} {value:.4f}")
            low, high = ax.get_ylim()  # axhline does not widen the axis by itself
            ax.set_ylim(min(low, value - 0.01), max(high, value + 0.01))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def history(frame: pd.DataFrame, path: str, title: str = "Fine-tuning",
            kept_epoch: Optional[int] = None, metrics=("accuracy", "loss", "auc")) -> str:
    """Train vs validation curves of one history; the kept epoch is circled."""
    metrics = [m for m in metrics if f"val_{m}" in frame or m in frame]
    train = frame[["epoch", *[m for m in metrics if m in frame]]]
    val = (frame[["epoch", *[f"val_{m}" for m in metrics if f"val_{m}" in frame]]]
           .rename(columns=lambda c: c.replace("val_", "")))
    return curves({"train": train, "validation": val}, path, metrics_to_plot=metrics,
                  title=title, marks={"validation": kept_epoch})


def sweep(table: pd.DataFrame, path: str, metric: str, describe,
          probe_cv: Optional[float] = None) -> str:
    """The sweep's CV score with error bars per configuration (best first)."""
    plt = pyplot()
    labels = [describe(r) for r in table.itertuples()]
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.28 * len(table) + 1.2)))
    y = np.arange(len(table))[::-1]
    ax.errorbar(table[f"cv_{metric}_mean"], y, xerr=table[f"cv_{metric}_std"], fmt="o",
                capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    if probe_cv is not None and np.isfinite(probe_cv):
        ax.axvline(probe_cv, color="grey", linestyle="--", label=f"linear probe {probe_cv:.4f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel(f"CV {metric} (mean +- std over folds)")
    ax.set_title("Sweep on cached features (best first)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save(fig, path)


def confusion_matrix(y, predicted, class_names: Sequence[str], path: str,
                     title: str) -> str:
    """Counts and row-normalised shares of true x predicted class, readable up to ~20
    classes (labels rotated and shrunk as K grows)."""
    from sklearn.metrics import ConfusionMatrixDisplay
    plt = pyplot()
    k = len(class_names)
    size = max(4.2, 0.45 * k + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size))
    font = 14 if k <= 4 else max(5, 12 - k // 3)
    for ax, normalize, what in ((axes[0], None, "counts"), (axes[1], "true", "share of row")):
        display = ConfusionMatrixDisplay.from_predictions(
            y, predicted, labels=list(range(k)), display_labels=list(class_names),
            normalize=normalize, cmap="Blues", colorbar=False, ax=ax,
            values_format="d" if normalize is None else ".2f", text_kw={"fontsize": font})
        display.ax_.set_title(what)
        ax.tick_params(axis="x", labelrotation=90 if k > 4 else 0, labelsize=max(6, 11 - k // 4))
        ax.tick_params(axis="y", labelsize=max(6, 11 - k // 4))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.02, 1, 0.96))  # room for the title and rotated labels
    return save(fig, path)


def roc(y, probs, class_names: Sequence[str], path: str, title: str) -> str:
    """Saves `roc_figure` at ``path``; returns the path."""
    return save(roc_figure(y, probs, class_names, title), path)


def roc_figure(y, probs, class_names: Sequence[str], title: str):
    """The ROC curve (binary), or one-vs-rest curves of every class (several classes).

    The legend gives each AUC to 4 decimals, as the logs, metrics.json and the report
    do (scikit-learn's display rounds to 2: 0.995 would read 1.00).
    """
    from sklearn.metrics import roc_auc_score, roc_curve
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    probs = np.asarray(probs)

    def curve(truth, scores, name):
        fpr, tpr, _ = roc_curve(truth, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth, scores):.4f})")

    if probs.ndim == 1:
        curve(y, probs, f"P({class_names[1]})")
    else:
        y = np.asarray(y)
        onehot = y if y.ndim == 2 else np.eye(probs.shape[1], dtype=int)[y]
        for c, name in enumerate(class_names):
            if 0 < onehot[:, c].sum() < len(onehot):
                curve(onehot[:, c], probs[:, c], name)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(-0.01, 1.01),
           ylim=(-0.01, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7 if len(class_names) > 8 else 9)
    fig.tight_layout()
    return fig


def gallery(paths: Sequence[str], order, captions: Sequence[str], path: str, title: str,
            columns: int = 3, empty: str = "nothing to show", heatmaps=None) -> str:
    """A contact sheet of the images ``order`` (indices into ``paths``) with captions;
    ``heatmaps`` (one [h, w] map in [0, 1] per image of ``order``) drawn over them."""
    import textwrap
    import tensorflow as tf
    from small_photo_classifier.pipeline import ops
    plt = pyplot()
    rows = max(1, int(np.ceil(len(order) / columns)))
    # Captions wrapped to the cell's width; each row is as tall as its longest caption
    # needs, so no caption runs into the photo above it.
    titles = [os.path.basename(paths[i])[:32] + "\n" + "\n".join(
        textwrap.wrap(c, 36) or [""]) for i, c in zip(order, captions)]
    lines = max([t.count("\n") + 1 for t in titles] or [1])
    # Constrained layout keeps every title clear of the row above (tight_layout did not).
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, (3.2 + 0.16 * lines) * rows),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, title_text in zip(axes.flat, order, titles):
        image = ops.resize_image(ops.decode_image_bytes(tf.io.read_file(paths[i]), 160), 160)
        ax.imshow(np.clip(image.numpy(), 0, 255).astype(np.uint8))
        if heatmaps is not None:
            heat = heatmaps[list(order).index(i)]
            ax.imshow(tf.image.resize(np.asarray(heat)[..., None], [160, 160]).numpy()[..., 0],
                      cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(title_text, fontsize=8)
    if not len(order):
        axes[0, 0].text(0.5, 0.5, empty, ha="center")
    fig.suptitle(title)
    return save(fig, path)


def learning_curve(table: pd.DataFrame, forecasts: dict, path: str, metric: str) -> str:
    """Score against labels, per model: the measured points with error bars (std over
    folds and subsets), the fitted law, and its extension to 2x / 4x with the bootstrap
    range when the fit supports one."""
    from small_photo_classifier.features.data import curve
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, result in forecasts.items():
        measured = table[(table.model == model) & (table.kind == "measured")]
        line = ax.errorbar(measured.labels, measured["mean"], yerr=measured["std"], fmt="o",
                           capsize=3, label=f"{model}")
        colour = line[0].get_color()
        if result.params is not None:
            top = result.labels * (4 if result.supported else 1)
            n = np.linspace(measured.labels.min(), top, 100)
            ax.plot(n, np.minimum(1.0, curve._law(n, *result.params)), "--", color=colour,
                    alpha=0.7, label=f"{model}: fitted" + (
                        ", extended to 4x" if result.supported else " (too noisy to extend)"))
        extra = table[(table.model == model) & (table.kind == "extrapolated")]
        if len(extra):
            ax.errorbar(extra.labels, extra["mean"],
                        # The point is the fitted law, the bar the bootstrap's 90% range:
                        # a skewed range can leave the point just outside it.
                        yerr=[np.maximum(0, extra["mean"] - extra["low"]),
                              np.maximum(0, extra["high"] - extra["mean"])],
                        fmt="s", mfc="none", color=colour, capsize=3)
    ax.set_xlabel("labelled images (per fold model)")
    ax.set_ylabel(f"CV {metric}")
    ax.set_title("Learning curve: measured (points), fitted and extended (squares: 2x, 4x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)
