"""Shared fixtures: tiny synthetic images written to temporary folders."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (-n auto): each worker, and every process a test starts (they
    # inherit the environment), computes on one thread. More only fight over the cores
    # the other workers use.
    for name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")

import re

import numpy as np
import pytest
import tensorflow as tf

# Every test starts and ends with the session's global state (dtype policy, seeds,
# environment, absl flags): see tests/global_state.py.
from tests.global_state import restore_global_state, session_global_state  # noqa: F401

pytest_plugins = ["pytester"]


def said(text: str) -> str:
    """``text`` with every run of whitespace one space: the console wraps error paragraphs
    at 100 columns, so where a line breaks depends on the words around it (a temporary
    folder's name, say); compare messages in this form."""
    return " ".join(text.split())


def write_image(path, array=None, size=40, seed=0, fmt=None):
    """Writes a small RGB image (JPEG or PNG by extension unless ``fmt`` is given)."""
    if array is None:
        array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    fmt = fmt or ("png" if path.lower().endswith(".png") else "jpeg")
    data = tf.io.encode_png(array) if fmt == "png" else tf.io.encode_jpeg(array, quality=95)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, data)
    return path


def colour_image(positive, size=40, seed=0):
    """Green noise; positives get a blue square, so tiny models can learn the labels."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 1] = rng.integers(80, 200, (size, size))
    if positive:
        q = size // 4
        image[q:3 * q, q:3 * q] = (60, 60, 230)
    return image


def class_folders(root, n: int, size: int = 36, classes=("neg", "pos")) -> str:
    """``n`` tiny images dealt in turn to the class folders ``root/<class>/``; the i-th
    class gets colour_image's positive look only for the last class. Returns the root."""
    for i in range(n):
        k = i % len(classes)
        write_image(os.path.join(str(root), classes[k], f"img{i}.jpg"),
                    colour_image(k == len(classes) - 1, size=size, seed=i))
    return str(root)


@pytest.fixture
def kaggle_dir(tmp_path):
    """A Kaggle-layout folder: 12 labelled train images, 5 test images, sample submission."""
    root = tmp_path / "kaggle"
    labels = [i % 2 for i in range(12)]
    for i, label in enumerate(labels, start=1):
        write_image(str(root / "train" / f"{i}.jpg"), colour_image(label, seed=i))
    (root / "train_labels.csv").write_text(
        "name,invasive\n" + "".join(f"{i},{l}\n" for i, l in enumerate(labels, start=1)))
    for i in range(1, 6):
        write_image(str(root / "test" / f"{i}.jpg"), colour_image(i % 2, seed=100 + i))
    # Row order deliberately not string-sorted: 10 must come after 9 and 2.
    (root / "sample_submission.csv").write_text(
        "name,invasive\n" + "".join(f"{i},0.5\n" for i in (2, 5, 1, 4, 3)))
    return root


@pytest.fixture
def folders_dir(tmp_path):
    """A class-folder layout: ants/ (4) and bees/ (5), plus a non-image file."""
    root = tmp_path / "folders"
    for i in range(4):
        write_image(str(root / "ants" / f"ant{i}.jpg"), seed=i)
    for i in range(5):
        write_image(str(root / "bees" / f"bee{i}.PNG"), seed=10 + i)
    (root / "ants" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory):
    """48 labelled 96 px photos (Kaggle layout) and 20 test photos, for process-level tests."""
    root = tmp_path_factory.mktemp("killdata")
    labels = [i % 2 for i in range(48)]
    for i, label in enumerate(labels, start=1):
        write_image(str(root / "train" / f"{i}.jpg"), colour_image(label, size=96, seed=i))
        if i <= 20:
            write_image(str(root / "test" / f"{i}.jpg"),
                        colour_image(label, size=96, seed=1000 + i))
    (root / "train_labels.csv").write_text(
        "name,invasive\n" + "".join(f"{i},{l}\n" for i, l in enumerate(labels, start=1)))
    return root


def checkpoint_epoch(folder) -> int:
    """The epoch of the fine-tuning checkpoint a resume would load (-1 when none)."""
    try:
        text = open(os.path.join(folder, "checkpoint"), encoding="utf-8").read()
    except OSError:
        return -1
    match = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', text, re.M)
    return int(match.group(1)) if match else -1


# Square colours of the multi-class test images: class k gets colour k (class 0: none).
CLASS_COLOURS = ((0, 0, 0), (60, 60, 230), (230, 60, 60), (230, 230, 40))


def class_image(k: int, size: int = 36, seed: int = 0, colours=CLASS_COLOURS):
    """Green noise with a centred square of class ``k``'s colour (none for class 0)."""
    image = colour_image(False, size=size, seed=seed)
    if k:
        q = size // 4
        image[q:3 * q, q:3 * q] = colours[k]
    return image


def trusted_run(root, size: int = 32, extra_info=None):
    """An exported binary ants/bees model (random weights, no training) with a
    calibration, an unfamiliar score and reference features, as the export writes them:
    the reference from 16 red and blue photos, the threshold from 8 others. Returns the
    run folder (``root``) and the photos' folder."""
    from small_photo_classifier.features import backbone, trust, trust_layers
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.pipeline import input as input_lib
    clf = backbone.build_classifier("none", include_top=False, image_size=size, seed=0,
                                    backbone="vgg16")
    photos = root / "photos"
    for i in range(24):
        write_image(str(photos / f"p{i}.jpg"), colour_image(i % 2, size=size, seed=i))
    paths = [str(photos / f"p{i}.jpg") for i in range(24)]
    batch = next(iter(input_lib.eval_dataset(paths, None, paths, size, 32)))["image"]
    out = np.asarray(trust_layers.with_features(clf.model)(batch), np.float64)
    probs, feats = out[:, 0], out[:, 1:]
    ref = trust.deduplicate(feats[:16])
    cal = trust.Calibration("temperature", (2.0,))
    fitted = trust.fit_unfamiliar(trust.distance(ref, feats[16:]),
                                  trust.uncertainty("binary", cal.apply("binary", probs[16:])),
                                  0.05, "test")
    np.savez(root / trust.REFERENCE_FILE, features=ref.astype(np.float16))
    inference.export_model(clf.model, str(root), {
        "image_size": size, "task": "binary", "class_names": ["ants", "bees"],
        "positive_class": "bees", "binary_column": "bees", "backbone": "vgg16",
        "calibration": cal.to_json(),
        "unfamiliar": {**fitted.to_json(), "reference_file": trust.REFERENCE_FILE},
        **(extra_info or {})})
    return root, photos


def predict_in_process(run, data, out, **flags):
    """predict.py's job on ``data`` with the run in ``run``, in this process (float32, one
    device, unreadable images skipped); ``flags`` override any other setting."""
    from small_photo_classifier.workflow.use import predicting
    cfg = predicting.PredictRun(
        workdir=str(run), data_dir=str(data), output=str(out), on_bad_image="skip",
        precision="float32", batch_size=4, strategy="none", cpu_replicas=1, ray_address=None,
        ray_workers=1, **flags)
    return predicting.run(cfg)
