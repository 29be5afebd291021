"""Where a run's exported model looked: heatmaps for predict.py --explain, the API's
``Run.explain`` and serve.py's predict page, one way for all three.

The heatmap is the class-activation map of `features.serve.explain` on the single
exported model (``model.keras``: a bag's members share its trunk), for the photo as
predict.py's input graph sees it (decoded, resized, mean-centred), upsampled to the
photo's own size. The class explained is the one the model predicts unless one is named
(several labels: the most probable).
"""

import dataclasses
import os
import re
from typing import List, Optional, Sequence

import numpy as np

from small_photo_classifier.features.task import Task
from small_photo_classifier.pipeline.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Explained:
    """One photo's heatmap: the pixels (RGB 0..255), the map at their size in [0, 1],
    the class explained and the model's (uncalibrated) probability of it."""
    pixels: np.ndarray
    heatmap: np.ndarray
    class_name: str
    probability: float


def read_photo(path: str, max_pixels: int) -> np.ndarray:
    """A photo file as RGB float32 0..255, decoded as the input graph decodes files, after
    its header says it is an image of at most ``max_pixels`` pixels."""
    from small_photo_classifier.pipeline import ops, scan
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file.")
    with open(path, "rb") as f:
        data = f.read(scan.max_file_bytes(max_pixels) + 1)
    # Checked from the header before anything is decoded, as every other reader does.
    problem = (scan.signature_problem(data) or scan.unreadable_size(data)
               or scan.too_many_pixels(data, max_pixels))
    if problem:
        raise ConfigError(f"{path}: the file {problem}.")
    return ops.decode()({"bytes": data})["image"].numpy().astype(np.float32)


def as_pixels(photo) -> np.ndarray:
    """An image array [H, W, 3] RGB 0..255 as float32, or one clear error."""
    photo = np.asarray(photo)
    if photo.ndim != 3 or photo.shape[-1] != 3:
        raise ConfigError(f"A photo as an array: expected [H, W, 3] RGB in 0..255; got shape "
                          f"{tuple(photo.shape)}.")
    return photo.astype(np.float32)


def eval_images(images: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """Images (RGB 0..255) as predict.py's input graph makes its decoded files: resized,
    mean-centred (`pipeline.ops`)."""
    import tensorflow as tf
    from small_photo_classifier.pipeline import ops
    return np.stack([ops.vgg_mean_centre_image(ops.resize_image(tf.constant(image),
                                                                image_size)).numpy()
                     for image in images])


class Explainer:
    """The run's single exported model, loaded once, explaining one photo at a time."""

    def __init__(self, workdir: str, info: dict, precision: str = "auto"):
        from small_photo_classifier.workflow.use import loaded
        self.task = Task.of_model(info)
        self.image_size = int(info["image_size"])
        self.classifier = loaded.load_classifier(workdir, precision)

    def class_index(self, class_: Optional[str], probs: np.ndarray) -> int:
        """The named class's index, or the predicted one's (several labels: the most
        probable)."""
        names = list(self.task.class_names)
        if class_ is not None:
            if class_ not in names:
                raise ConfigError(f"class {class_!r}: the run's classes are "
                                  f"{', '.join(names)}.")
            return names.index(class_)
        # The most probable class (binary: above one half; several labels: the surest).
        return int(np.argmax(probs))

    def explain(self, pixels: np.ndarray, class_: Optional[str] = None) -> Explained:
        """The heatmap of ``class_`` (default: the predicted class) on one photo (RGB
        0..255), at the photo's own size."""
        return self._explain(eval_images([pixels], self.image_size), pixels, class_)

    def explain_eval(self, image: np.ndarray, class_: Optional[str] = None) -> Explained:
        """The same for one image already through the eval path ([S, S, 3], as serve.py
        decodes an upload), at the model's input size."""
        from small_photo_classifier.pipeline import ops
        pixels = np.clip(ops.vgg_mean_uncentre_image(np.asarray(image, np.float32)).numpy(),
                         0, 255)
        return self._explain(np.asarray(image)[None], pixels, class_)

    def _explain(self, images: np.ndarray, pixels: np.ndarray, class_) -> Explained:
        from small_photo_classifier.features.serve import explain
        clf = self.classifier
        probs = self.task.probabilities(np.asarray(clf.model(images, training=False)))[0]
        if self.task.kind == "binary":  # P(positive) -> one probability per class
            probs = np.array([1 - probs, probs])
        index = self.class_index(class_, probs)
        cam = explain.grad_cam(clf, images, self.task.kind, index)[0]
        return Explained(pixels, explain.upsampled(cam, *pixels.shape[:2]),
                         self.task.class_names[index], float(probs[index]))


def png(explained: Explained, title: Optional[str] = None) -> bytes:
    """`figure` as PNG bytes (serve.py's answer)."""
    import io
    buffer = io.BytesIO()
    figure(explained, title).savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def figure(explained: Explained, title: Optional[str] = None):
    """The photo with its heatmap over it: a matplotlib Figure."""
    from small_photo_classifier.features.serve import explain
    return explain.overlay(explained.pixels, explained.heatmap, title=title or (
        f"where the model saw {explained.class_name} (p {explained.probability:.2f})"))


def most_uncertain(task: Task, probs: np.ndarray, n: int) -> List[int]:
    """The ``n`` rows the model is least sure of (NaN rows, unreadable photos, never):
    the lowest probability of the predicted class (several labels: of the least sure
    label's decision)."""
    probs = np.asarray(probs, np.float64)
    if task.kind == "multiclass":
        sure = probs.max(axis=1)
    else:
        sure = np.maximum(probs, 1 - probs)
        sure = sure.min(axis=1) if sure.ndim == 2 else sure
    sure = np.where(np.isfinite(sure), sure, np.inf)
    order = np.argsort(sure, kind="stable")
    return [int(i) for i in order[:n] if np.isfinite(sure[i])]


def chosen_rows(spec: str, names: Sequence[str], paths: Sequence[str] = ()
                ) -> Optional[List[int]]:
    """``--explain``'s named photos (the CSV's names, or file names) as row indices (None
    when it is a count); a name that is not among the photos is one clear error, before
    anything is predicted."""
    if spec.strip().isdigit():
        return None
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    where = {os.path.basename(p): i for i, p in enumerate(paths)}
    where.update({n: i for i, n in enumerate(names)})
    missing = [w for w in wanted if w not in where]
    if missing:
        raise ConfigError(f"--explain={spec}: {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not among the "
                          f"{len(names)} photos given (expected a count, e.g. --explain=4, "
                          "or names of photos: the CSV's name column, or file names).")
    return [where[w] for w in wanted]


def overlay_name(name: str) -> str:
    """A photo's name as its overlay's file name: ``a/b.jpg`` -> ``a__b.png``."""
    stem = os.path.splitext(name)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "__", stem) + ".png"


def write_overlays(workdir: str, info: dict, frame, rows: Sequence[int], folder: str,
                   precision: str = "auto", max_pixels: Optional[int] = None) -> List[str]:
    """One PNG per row of ``frame`` (its ``path`` and ``name``) in ``folder``, named after
    the photo: the photo, its heatmap for the predicted class, and the class's
    probability. Returns the files written."""
    from small_photo_classifier.pipeline import limits
    from small_photo_classifier.workflow.views import plots
    explainer = Explainer(workdir, info, precision)
    os.makedirs(folder, exist_ok=True)
    written, used = [], set()
    for i in rows:
        row = frame.iloc[i]
        explained = explainer.explain(read_photo(row.path, max_pixels or limits.MAX_PIXELS))
        name = overlay_name(str(row["name"]))
        while name in used:  # a.jpg and a.png: both kept
            name = name[:-4] + "_.png"
        used.add(name)
        title = (f"{row['name']}: {explained.class_name} "
                 f"(p {explained.probability:.2f} before calibration)")
        written.append(plots.save(figure(explained, title), os.path.join(folder, name)))
    return written
