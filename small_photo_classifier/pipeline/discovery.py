"""Finding labelled images on disk: the two layouts, and the images to predict.

* **Kaggle**: ``train/<name>.jpg`` plus ``train_labels.csv`` (see `pipeline.labels`
  for its forms: binary ``name,invasive``, one class per image, or several labels
  per image); optionally ``test/`` and ``sample_submission.csv``.
* **Class folders** (Keras ``flow_from_directory``): ``<data_dir>/<class>/<image>``,
  two folders (binary, the second in sorted order positive) or more (multi-class).

Everything returns plain pandas frames with columns ``path, name, label`` so the
rest of the tool has one source of truth for which image is which. The train /
validation split is `pipeline.split`.
"""

import dataclasses
import logging
import os
import re
from typing import Optional, Sequence

import pandas as pd

from small_photo_classifier.pipeline import labels as labels_lib
from small_photo_classifier.pipeline.errors import ConfigError, DataError
from small_photo_classifier.pipeline.labels import (IMAGE_EXTENSIONS, NAME_COLUMN, image_name,
                                                    is_image_file, listing)

LABELS_CSV = "train_labels.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
LABEL_COLUMN = labels_lib.LABEL_COLUMN
KAGGLE_CLASS_NAMES = ("0", "1")
# A class needs this many images: one to train on and one to validate with.
MIN_PER_CLASS = 2


@dataclasses.dataclass
class Dataset:
    """Labelled images found in a data folder.

    Attributes:
      frame: one row per labelled image, columns ``path`` (absolute), ``name``
        (file name without extension; the id used in CSVs) and ``label`` (encoded
        as `pipeline.labels` says), sorted by name.
      layout: ``"kaggle"`` or ``"folders"``.
      class_names: the classes in their fixed order ((negative, positive) for binary).
      kind: "binary", "multiclass" or "multilabel".
      data_dir: the folder that was scanned.
      test_dir: the Kaggle ``test/`` folder if present.
      sample_submission: path of ``sample_submission.csv`` if present.
      ignored: number of files skipped because their extension is not an image's.
      ignored_files: their paths (a message names them).
      label_column: Kaggle layout: the labels CSV's one label column (e.g. ``invasive``;
        None for one 0/1 column per label), which names a binary model's probability
        column and the column of ``labels_template.csv``.
    """

    frame: pd.DataFrame
    layout: str
    class_names: tuple
    data_dir: str
    test_dir: Optional[str] = None
    sample_submission: Optional[str] = None
    ignored: int = 0
    kind: str = "binary"
    ignored_files: tuple = ()
    label_column: Optional[str] = None


def list_images(folder: str):
    """Lists image files directly inside ``folder``.

    Returns:
      (paths, ignored): sorted absolute paths of files with an image extension,
      and the paths of the other files (hidden files excluded from both).
    """
    paths, ignored = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            if is_image_file(entry.name):
                paths.append(os.path.abspath(entry.path))
            else:
                ignored.append(os.path.abspath(entry.path))
    return sorted(paths), sorted(ignored)


def _names_to_paths(paths: Sequence[str], folder: str) -> dict:
    """Maps image names (file name minus extension) to paths; rejects clashes."""
    by_name = {}
    for path in paths:
        name = image_name(path)
        if name in by_name:
            raise DataError(
                f"Two images in {folder} have the same name {name!r}: "
                f"{os.path.basename(by_name[name])!r} and {os.path.basename(path)!r}. "
                "Names (file names without extension) must be unique, because they are "
                "the ids used in the labels and submission CSVs.")
        by_name[name] = path
    return by_name


def discover(data_dir: str, positive_class: Optional[str] = None,
             label_column: Optional[str] = None, task: Optional[str] = None) -> Dataset:
    """Finds the labelled images under ``data_dir`` and detects the layout and the task.

    Args:
      data_dir: a Kaggle-layout root or a folder of class folders.
      positive_class: binary: which class is positive (label 1). Default: the second
        class in sorted order ("1" in the Kaggle layout).
      label_column: Kaggle layout: which column of the labels CSV to use.
      task: "binary", "multiclass" or "multilabel" instead of detecting it.

    Raises:
      DataError: the folder is missing, empty, of neither layout, or its labels
        are inconsistent with its images.
    """
    if not data_dir:
        raise DataError("No data folder given: pass --data_dir=PATH (or --demo for the "
                        "built-in synthetic data).")
    if not os.path.isdir(data_dir):
        raise DataError(f"Data folder {data_dir!r} does not exist or is not a folder.")
    data_dir = os.path.abspath(data_dir)
    entries = [e for e in os.listdir(data_dir) if not e.startswith(".")]
    if not entries:
        raise DataError(f"Data folder {data_dir} is empty: expected either train/ and "
                        f"{LABELS_CSV} (Kaggle layout) or class folders.")
    if os.path.isfile(os.path.join(data_dir, LABELS_CSV)):
        dataset = _discover_kaggle(data_dir, label_column, task, positive_class)
    else:
        dataset = _discover_folders(data_dir, entries, positive_class, task)
    _check_class_sizes(dataset)
    per_class = labels_lib.counts(dataset.kind, dataset.class_names, dataset.frame.label)
    logging.info("Found %d labelled images in %s (%s layout, %s task): %s%s.",
                 len(dataset.frame), data_dir, dataset.layout, dataset.kind,
                 ", ".join(f"{c} {n}" for n, c in per_class.items())
                 + (f" (positive class {dataset.class_names[1]!r})"
                    if dataset.kind == "binary" else ""),
                 f"; ignored {dataset.ignored} non-image file(s): " + labels_lib.listing(
                     [os.path.relpath(p, data_dir) for p in dataset.ignored_files], 5)
                 if dataset.ignored else "")
    return dataset


def _check_class_sizes(dataset: Dataset) -> None:
    """Every class needs images on both sides of the split."""
    per_class = labels_lib.counts(dataset.kind, dataset.class_names, dataset.frame.label)
    small = {n: c for n, c in per_class.items() if c < MIN_PER_CLASS}
    if small and dataset.kind != "multilabel":
        where = ("class folder" if dataset.layout == "folders" else "class")
        raise DataError(
            "Each class needs at least 2 images (one to train on, one to validate with); "
            + "; ".join(f"{where} {name!r} has {count}" for name, count in small.items())
            + ". Add images, or leave the class out.")


def _discover_folders(data_dir, entries, positive_class, task) -> Dataset:
    subdirs = sorted(e for e in entries if os.path.isdir(os.path.join(data_dir, e)))
    if not subdirs:
        raise DataError(
            f"Data folder {data_dir} is neither layout: it has no {LABELS_CSV} (Kaggle "
            f"layout) and no class folders (class-folder layout). Found files: "
            f"{listing(sorted(entries))}.")
    if "train" in subdirs:
        raise DataError(
            f"Data folder {data_dir} has a train/ folder but no {LABELS_CSV}: for the Kaggle "
            f"layout put the labels CSV (columns {NAME_COLUMN},<label>) next to train/; for "
            "the class-folder layout point --data_dir at the folder that holds the class "
            "folders.")
    if len(subdirs) < 2:
        raise DataError(f"Class-folder layout needs at least two class folders in {data_dir}; "
                        f"found {len(subdirs)}: {listing(subdirs)}.")
    if task == "multilabel":
        raise ConfigError("--task=multilabel needs a labels CSV (one image sits in one class "
                          "folder); use the Kaggle layout with a tags column.")
    kind = task or ("binary" if len(subdirs) == 2 else "multiclass")
    if kind == "binary" and len(subdirs) != 2:
        raise ConfigError(f"--task=binary needs exactly two class folders; {data_dir} has "
                          f"{len(subdirs)}: {listing(subdirs)}.")
    frame, ignored = _folder_frame(data_dir, subdirs)
    if kind == "binary":
        positive_class = positive_class or subdirs[1]
        if positive_class not in subdirs:
            raise ConfigError(f"--positive_class={positive_class!r} is not one of the class "
                              f"folders in {data_dir}: {listing(subdirs)}.")
        class_names = tuple(c for c in subdirs if c != positive_class) + (positive_class,)
    else:
        if positive_class is not None:
            raise ConfigError(f"--positive_class applies to two classes; {data_dir} has "
                              f"{len(subdirs)} class folders.")
        class_names = tuple(subdirs)
    index = {c: i for i, c in enumerate(class_names)}
    frame["label"] = [index[c] for c in frame.pop("class")]
    return Dataset(frame=frame, layout="folders", class_names=class_names, data_dir=data_dir,
                   ignored=len(ignored), kind=kind, ignored_files=tuple(ignored))


def _folder_frame(data_dir: str, classes: Sequence[str]):
    """(frame of path, name, class for every image in the class folders, ignored files)."""
    frames, ignored = [], []
    for cls in classes:
        folder = os.path.join(data_dir, cls)
        paths, skipped = list_images(folder)
        ignored += skipped
        if not paths:
            raise DataError(
                f"Class folder {folder} has no images (expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case).")
        frames.append(pd.DataFrame({"path": paths, "name": [image_name(p) for p in paths],
                                    "class": cls}))
    frame = pd.concat(frames, ignore_index=True)
    clashes = frame.name.duplicated(keep=False)
    if clashes.any():
        # Names are the ids in split and prediction CSVs: qualify the ones that
        # occur in several class folders with their folder ("cats/1").
        frame.loc[clashes, "name"] = [f"{c}/{n}" for c, n in
                                      zip(frame["class"][clashes], frame.name[clashes])]
        logging.info("%d image names occur in more than one class folder; they are written "
                     "as <class>/<name>.", int(clashes.sum()))
    return frame.sort_values("name", kind="stable").reset_index(drop=True), ignored


def folder_labels(data_dir: str) -> pd.DataFrame:
    """``name, class`` of every image in a class-folder tree (for scoring predictions)."""
    subdirs = sorted(e for e in os.listdir(data_dir) if not e.startswith(".")
                     and os.path.isdir(os.path.join(data_dir, e)))
    if not subdirs:
        raise DataError(f"{data_dir} has no class folders to take labels from.")
    frame, _ = _folder_frame(os.path.abspath(data_dir), subdirs)
    return frame[["name", "class"]]


def _discover_kaggle(data_dir, label_column, task, positive_class) -> Dataset:
    train_dir = os.path.join(data_dir, "train")
    csv_path = os.path.join(data_dir, LABELS_CSV)
    if not os.path.isdir(train_dir):
        raise DataError(f"Kaggle layout: found {csv_path} but no train/ folder of images "
                        f"next to it.")
    paths, ignored = list_images(train_dir)
    if not paths:
        raise DataError(f"Kaggle layout: {train_dir} has no images (expected files ending "
                        f"in {', '.join(IMAGE_EXTENSIONS)}, any case).")
    by_name = _names_to_paths(paths, train_dir)
    sample = os.path.join(data_dir, SAMPLE_SUBMISSION_CSV)
    order = None
    if os.path.isfile(sample) and len(labels_lib.sample_columns(sample)) > 1:
        order = labels_lib.sample_columns(sample)  # the submission's class columns, in order
    labels = labels_lib.read_labels(csv_path, label_column, task, order, positive_class)
    if positive_class is not None and labels.kind == "binary" and \
            labels.class_names == KAGGLE_CLASS_NAMES and positive_class != "1":
        raise ConfigError(
            f"--positive_class={positive_class!r} does not apply to the Kaggle layout, "
            f"whose train_labels.csv names the positive class 1 (its 0/1 labels).")
    table = labels.frame
    missing = [(line, name) for line, name in zip(table.line, table.name)
               if name not in by_name]
    if missing:
        raise DataError(
            f"{csv_path} lists names with no image in {train_dir}: " + ", ".join(
                f"line {line}: {name!r}" for line, name in missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + ". Each name must match an image file name without its extension.")
    unlabelled = sorted(set(by_name) - set(table.name))
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} image(s) in {train_dir} have no label in {csv_path}: "
            f"{listing(os.path.basename(by_name[n]) for n in unlabelled)}. Add a row for "
            "each, or move the images out of train/.")
    frame = pd.DataFrame({"path": [by_name[n] for n in table.name],
                          "name": table.name.to_numpy(), "label": table.label.tolist()})
    frame = frame.sort_values("name", kind="stable").reset_index(drop=True)
    test_dir = os.path.join(data_dir, "test")
    return Dataset(frame=frame, layout="kaggle", class_names=labels.class_names,
                   data_dir=data_dir, test_dir=test_dir if os.path.isdir(test_dir) else None,
                   sample_submission=sample if os.path.isfile(sample) else None,
                   ignored=len(ignored), ignored_files=tuple(ignored), kind=labels.kind,
                   label_column=labels.columns[0] if len(labels.columns) == 1 else None)


def read_labels_csv(csv_path: str) -> pd.DataFrame:
    """Reads a binary ``name,invasive`` labels CSV into columns ``name, label, line``."""
    return labels_lib.read_labels(csv_path, task="binary").frame


def natural_key(name: str):
    """Sort key that puts "2" before "10" (numbers compared as numbers)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def _is_class_tree(data_dir: str) -> bool:
    """A folder with no images of its own but sub-folders that hold images."""
    if list_images(data_dir)[0]:
        return False
    subdirs = [e for e in os.listdir(data_dir) if not e.startswith(".")
               and os.path.isdir(os.path.join(data_dir, e))]
    return any(list_images(os.path.join(data_dir, d))[0] for d in subdirs)


def discover_unlabelled(data_dir: str) -> pd.DataFrame:
    """Images to predict under ``data_dir``, as columns ``path, name`` in output order.

    ``data_dir`` is a Kaggle root (then ``test/`` is predicted and, if
    ``sample_submission.csv`` exists, exactly its names in exactly its row
    order), a plain folder of images (natural order: 2 before 10), a tree of
    class folders (every image in them, by name; a name in several folders is
    written ``<class>/<name>``), or one image file.
    """
    if data_dir and os.path.isfile(data_dir):
        if not is_image_file(data_dir):
            raise DataError(f"--data_dir={data_dir!r} is a file but not an image (expected a "
                            f"folder, or one file ending in {', '.join(IMAGE_EXTENSIONS)}).")
        path = os.path.abspath(data_dir)
        return pd.DataFrame({"path": [path], "name": [image_name(path)]})
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"Folder to predict {data_dir!r} does not exist (expected a folder of "
                        "images, a Kaggle root with test/, or one image file).")
    data_dir = os.path.abspath(data_dir)
    test_dir = os.path.join(data_dir, "test")
    is_kaggle = os.path.isdir(test_dir) and (
        os.path.isfile(os.path.join(data_dir, LABELS_CSV))
        or os.path.isfile(os.path.join(data_dir, SAMPLE_SUBMISSION_CSV))
        or not list_images(data_dir)[0])
    if not is_kaggle and _is_class_tree(data_dir):
        classes = sorted(e for e in os.listdir(data_dir) if not e.startswith(".")
                         and os.path.isdir(os.path.join(data_dir, e))
                         and list_images(os.path.join(data_dir, e))[0])
        frame, _ = _folder_frame(data_dir, classes)
        order = sorted(range(len(frame)), key=lambda i: natural_key(frame.name[i]))
        return frame.iloc[order].reset_index(drop=True)[["path", "name"]]
    folder = test_dir if is_kaggle else data_dir
    paths, ignored = list_images(folder)
    if ignored:
        logging.info("Ignored %d non-image file(s) in %s: %s.", len(ignored), folder,
                     labels_lib.listing([os.path.basename(p) for p in ignored], 5))
    if not paths:
        raise DataError(f"No images to predict in {folder} (expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case).")
    by_name = _names_to_paths(paths, folder)
    sample = os.path.join(data_dir, SAMPLE_SUBMISSION_CSV)
    if is_kaggle and os.path.isfile(sample):
        rows = labels_lib.read_names_csv(sample, (NAME_COLUMN,))
        names = [image_name(n) if is_image_file(n) else n for n in rows[NAME_COLUMN]]
        missing = [(line, n) for line, n in zip(rows.line, names) if n not in by_name]
        if missing:
            raise DataError(
                f"{sample} lists names with no image in {folder}: " + ", ".join(
                    f"line {line}: {n!r}" for line, n in missing[:5])
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + ".")
        extra = len(by_name) - len(set(names))
        if extra:
            logging.warning("%d image(s) in %s are not in %s and will not be predicted.",
                            extra, folder, sample)
    else:
        names = sorted(by_name, key=natural_key)
    return pd.DataFrame({"path": [by_name[n] for n in names], "name": names})
