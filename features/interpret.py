"""Interpretation plots: confusion matrix, ROC curve, and the top losses.

What a practitioner looks at after the numbers: where the errors are (confusion
matrix at the 0.5 threshold), how the ranking trades off (ROC), and *which*
images the model gets most confidently wrong (top losses) — often mislabelled
photos or a systematic blind spot. Every PNG is written atomically.
"""

import os
from typing import Dict, Sequence

import numpy as np

from pipeline.atomic import atomic_path

FILES = ("confusion_matrix.png", "roc.png", "top_losses.png")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _pyplot().close(fig)
    return path


def confusion_matrix_png(labels, probs, path: str, class_names=("0", "1")) -> str:
    """Counts of true class x predicted class at the 0.5 threshold."""
    from sklearn.metrics import confusion_matrix
    plt = _pyplot()
    matrix = confusion_matrix(np.asarray(labels).astype(int),
                              (np.asarray(probs) >= 0.5).astype(int), labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black", fontsize=14)
    ax.set_xticks([0, 1], [str(c) for c in class_names])
    ax.set_yticks([0, 1], [str(c) for c in class_names])
    ax.set_xlabel("predicted (P >= 0.5)")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix, {len(probs)} images")
    fig.tight_layout()
    return _save(fig, path)


def roc_png(labels, probs, path: str) -> str:
    """The ROC curve with its AUC."""
    from sklearn import metrics
    plt = _pyplot()
    fpr, tpr, _ = metrics.roc_curve(np.asarray(labels).astype(int), probs)
    auc = metrics.roc_auc_score(np.asarray(labels).astype(int), probs)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC, {len(probs)} images")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def top_losses(labels, probs, n: int = 9) -> np.ndarray:
    """Indices of the ``n`` largest binary cross-entropy losses that are errors at 0.5,
    most confident first."""
    labels = np.asarray(labels).astype(int)
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    loss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    wrong = np.flatnonzero((p >= 0.5) != (labels == 1))
    return wrong[np.argsort(-loss[wrong], kind="stable")][:n]


def top_losses_png(paths: Sequence[str], labels, probs, path: str, class_names=("0", "1"),
                   n: int = 9) -> str:
    """A gallery of the most confidently wrong images with true label and P(positive)."""
    import tensorflow as tf
    from pipeline import ops
    plt = _pyplot()
    order = top_losses(labels, probs, n)
    cols = 3
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        image = ops.decode_image_bytes(tf.io.read_file(paths[i]), 160)
        image = ops.resize_image(image, 160)
        ax.imshow(np.clip(image.numpy(), 0, 255).astype(np.uint8))
        ax.set_title(f"{os.path.basename(paths[i])[:24]}\ntrue {class_names[int(labels[i])]}, "
                     f"P({class_names[1]}) = {probs[i]:.3f}", fontsize=8)
    if not len(order):
        axes[0, 0].text(0.5, 0.5, "no errors at the 0.5 threshold", ha="center")
    fig.suptitle(f"Top losses: the {len(order)} most confidently wrong of {len(probs)} images")
    fig.tight_layout()
    return _save(fig, path)


def write_all(folder: str, paths: Sequence[str], labels, probs, class_names=("0", "1"),
              prefix: str = "") -> Dict[str, str]:
    """The three PNGs into ``folder`` as ``<prefix>confusion_matrix.png`` etc.

    ROC needs both classes; with one class only the other two are drawn.
    """
    os.makedirs(folder or ".", exist_ok=True)
    out = {"confusion matrix": confusion_matrix_png(
        labels, probs, os.path.join(folder, prefix + FILES[0]), class_names)}
    if len(np.unique(np.asarray(labels).astype(int))) == 2:
        out["ROC"] = roc_png(labels, probs, os.path.join(folder, prefix + FILES[1]))
    out["top losses"] = top_losses_png(paths, labels, probs,
                                       os.path.join(folder, prefix + FILES[2]), class_names)
    return out
