"""Finding labelled images on disk, and splitting them into train/validation.

Two layouts are detected from the data folder:

* **Kaggle**: ``train/<name>.jpg`` plus ``train_labels.csv`` with columns
  ``name,invasive`` (0/1); optionally ``test/`` and ``sample_submission.csv``.
* **Class folders** (Keras ``flow_from_directory``): ``<data_dir>/<class>/<image>``
  with exactly two classes.

Everything returns plain pandas frames with columns ``path, name, label`` so the
rest of the tool has one source of truth for which image is which.
"""

import dataclasses
import logging
import os
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LABELS_CSV = "train_labels.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
NAME_COLUMN = "name"
LABEL_COLUMN = "invasive"
KAGGLE_CLASS_NAMES = ("0", "1")

# How many offending items an error message lists before it says "and N more".
_MAX_LISTED = 5


@dataclasses.dataclass
class Dataset:
    """Labelled images found in a data folder.

    Attributes:
      frame: one row per labelled image, columns ``path`` (absolute), ``name``
        (file name without extension; the id used in CSVs) and ``label`` (0/1,
        1 = positive class), sorted by name.
      layout: ``"kaggle"`` or ``"folders"``.
      class_names: (negative, positive) class names.
      data_dir: the folder that was scanned.
      test_dir: the Kaggle ``test/`` folder if present.
      sample_submission: path of ``sample_submission.csv`` if present.
      ignored: number of files skipped because their extension is not an image's.
    """

    frame: pd.DataFrame
    layout: str
    class_names: tuple
    data_dir: str
    test_dir: Optional[str] = None
    sample_submission: Optional[str] = None
    ignored: int = 0


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f" and {len(items) - _MAX_LISTED} more"
    return shown


def is_image_file(filename: str) -> bool:
    """True if the file name has an image extension we read (case-insensitive)."""
    return os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str):
    """Lists image files directly inside ``folder``.

    Returns:
      (paths, ignored): sorted absolute paths of files with an image extension,
      and the number of other files (hidden files excluded from both).
    """
    paths, ignored = [], 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            if is_image_file(entry.name):
                paths.append(os.path.abspath(entry.path))
            else:
                ignored += 1
    return sorted(paths), ignored


def image_name(path: str) -> str:
    """The id of an image in CSVs: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


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


def discover(data_dir: str, positive_class: Optional[str] = None) -> Dataset:
    """Finds the labelled images under ``data_dir`` and detects the layout.

    Args:
      data_dir: a Kaggle-layout root or a folder of two class folders.
      positive_class: for the class-folder layout, which class is positive
        (label 1). Default: the second class in sorted order.

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
                        f"{LABELS_CSV} (Kaggle layout) or two class folders.")
    if os.path.isfile(os.path.join(data_dir, LABELS_CSV)):
        dataset = _discover_kaggle(data_dir)
    else:
        dataset = _discover_folders(data_dir, entries, positive_class)
    if positive_class is not None and dataset.layout == "kaggle" and positive_class != "1":
        raise ConfigError(
            f"--positive_class={positive_class!r} does not apply to the Kaggle layout, "
            f"whose positive class is always invasive=1.")
    logging.info("Found %d labelled images in %s (%s layout): %d %s (negative), %d %s "
                 "(positive)%s.", len(dataset.frame), data_dir, dataset.layout,
                 int((dataset.frame.label == 0).sum()), dataset.class_names[0],
                 int((dataset.frame.label == 1).sum()), dataset.class_names[1],
                 f"; ignored {dataset.ignored} non-image files" if dataset.ignored else "")
    return dataset


def _discover_folders(data_dir, entries, positive_class) -> Dataset:
    subdirs = sorted(e for e in entries if os.path.isdir(os.path.join(data_dir, e)))
    if not subdirs:
        raise DataError(
            f"Data folder {data_dir} is neither layout: it has no {LABELS_CSV} (Kaggle "
            f"layout) and no class folders (class-folder layout). Found files: "
            f"{_listing(sorted(entries))}.")
    if "train" in subdirs:
        raise DataError(
            f"Data folder {data_dir} has a train/ folder but no {LABELS_CSV}: for the Kaggle "
            f"layout put the labels CSV (columns {NAME_COLUMN},{LABEL_COLUMN}) next to "
            f"train/; for the class-folder layout point --data_dir at the folder that holds "
            f"the two class folders.")
    if len(subdirs) != 2:
        raise DataError(
            f"Class-folder layout needs exactly two class folders in {data_dir}; found "
            f"{len(subdirs)}: {_listing(subdirs)}.")
    frames, ignored = [], 0
    for cls in subdirs:
        folder = os.path.join(data_dir, cls)
        paths, skipped = list_images(folder)
        ignored += skipped
        if not paths:
            raise DataError(
                f"Class folder {folder} has no images (expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case).")
        frames.append(pd.DataFrame({"path": paths, "name": [image_name(p) for p in paths],
                                    "class": cls}))
    if positive_class is None:
        positive_class = subdirs[1]
    if positive_class not in subdirs:
        raise ConfigError(f"--positive_class={positive_class!r} is not one of the class "
                          f"folders in {data_dir}: {_listing(subdirs)}.")
    negative_class = subdirs[0] if positive_class == subdirs[1] else subdirs[1]
    frame = pd.concat(frames, ignore_index=True)
    frame["label"] = (frame.pop("class") == positive_class).astype(np.int64)
    clashes = frame.name.duplicated(keep=False)
    if clashes.any():
        # Names are the ids in split and prediction CSVs: qualify the ones that
        # occur in both class folders with their folder ("cats/1").
        frame.loc[clashes, "name"] = [f"{os.path.basename(os.path.dirname(p))}/{n}" for p, n in
                                      zip(frame.path[clashes], frame.name[clashes])]
        logging.info("%d image names occur in both class folders; they are written as "
                     "<class>/<name>.", int(clashes.sum()))
    frame = frame.sort_values("name", kind="stable").reset_index(drop=True)
    return Dataset(frame=frame, layout="folders", class_names=(negative_class, positive_class),
                   data_dir=data_dir, ignored=ignored)


def _discover_kaggle(data_dir) -> Dataset:
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
    labels = read_labels_csv(csv_path)
    missing = [(line, name) for line, name in zip(labels.line, labels.name)
               if name not in by_name]
    if missing:
        raise DataError(
            f"{csv_path} lists names with no image in {train_dir}: " + ", ".join(
                f"line {line}: {name!r}" for line, name in missing[:_MAX_LISTED])
            + (f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else "")
            + ". Each name must match an image file name without its extension.")
    unlabelled = sorted(set(by_name) - set(labels.name))
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} image(s) in {train_dir} have no label in {csv_path}: "
            f"{_listing(os.path.basename(by_name[n]) for n in unlabelled)}. Add a row for "
            "each, or move the images out of train/.")
    frame = pd.DataFrame({"path": [by_name[n] for n in labels.name],
                          "name": labels.name.to_numpy(),
                          "label": labels.label.to_numpy(np.int64)})
    frame = frame.sort_values("name", kind="stable").reset_index(drop=True)
    test_dir = os.path.join(data_dir, "test")
    sample = os.path.join(data_dir, SAMPLE_SUBMISSION_CSV)
    return Dataset(frame=frame, layout="kaggle", class_names=KAGGLE_CLASS_NAMES,
                   data_dir=data_dir,
                   test_dir=test_dir if os.path.isdir(test_dir) else None,
                   sample_submission=sample if os.path.isfile(sample) else None,
                   ignored=ignored)


def _check_name(name: str, csv_path: str, line: int) -> None:
    """Rejects names that would point outside the image folder."""
    if not name:
        raise DataError(f"{csv_path} line {line}: the {NAME_COLUMN} is empty.")
    if ("/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name)
            or "\x00" in name):
        raise DataError(
            f"{csv_path} line {line}: name {name!r} contains a path; names must be plain "
            f"file names (without folders), so that they can only refer to images inside "
            "the data folder.")


def read_names_csv(csv_path: str, required: Sequence[str]) -> pd.DataFrame:
    """Reads a CSV whose first column block includes ``required`` columns, as strings.

    Tolerates a UTF-8 byte-order mark and whitespace around headers and values.
    Adds a ``line`` column with each row's line number in the file (header = 1).

    Raises:
      DataError: unreadable file, missing columns, or empty/path-like names.
    """
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False,
                            encoding="utf-8-sig", skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError,
            pd.errors.EmptyDataError) as err:
        raise DataError(f"Cannot read {csv_path} as a CSV file: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    absent = [c for c in required if c not in frame.columns]
    if absent:
        raise DataError(
            f"{csv_path} must have columns {', '.join(required)}; missing "
            f"{', '.join(absent)} (found columns: {', '.join(map(str, frame.columns)) or 'none'}).")
    frame = frame[list(required)].apply(lambda col: col.str.strip())
    frame["line"] = np.arange(2, len(frame) + 2)
    for name, line in zip(frame[NAME_COLUMN], frame.line):
        _check_name(name, csv_path, int(line))
    dupes = frame[frame[NAME_COLUMN].duplicated(keep=False)]
    if len(dupes):
        first = dupes.groupby(NAME_COLUMN, sort=False).line.apply(list)
        raise DataError(
            f"{csv_path} has duplicate names: " + "; ".join(
                f"{name!r} on lines {', '.join(map(str, lines))}"
                for name, lines in list(first.items())[:_MAX_LISTED]) + ".")
    return frame.reset_index(drop=True)


def read_labels_csv(csv_path: str) -> pd.DataFrame:
    """Reads ``train_labels.csv`` into columns ``name, label, line``.

    Accepts labels written 0/1 or 0.0/1.0. A name may carry its image extension
    (``12.jpg``); it is stripped so that names match file names without extension.

    Raises:
      DataError: naming the line of the first bad value.
    """
    frame = read_names_csv(csv_path, (NAME_COLUMN, LABEL_COLUMN))
    if frame.empty:
        raise DataError(f"{csv_path} has a header but no rows.")
    frame[NAME_COLUMN] = [image_name(n) if is_image_file(n) else n for n in frame[NAME_COLUMN]]
    labels = []
    for raw, line in zip(frame[LABEL_COLUMN], frame.line):
        try:
            value = float(raw)
        except ValueError:
            value = None
        if value not in (0.0, 1.0):
            raise DataError(f"{csv_path} line {line}: label {raw!r} in column "
                            f"{LABEL_COLUMN!r} must be 0 or 1.")
        labels.append(int(value))
    frame["label"] = labels
    dupes = frame[frame[NAME_COLUMN].duplicated(keep=False)]
    if len(dupes):  # e.g. "12" and "12.jpg"
        raise DataError(f"{csv_path} names the same image twice: " + ", ".join(
            f"line {line}: {name!r}" for name, line in zip(dupes[NAME_COLUMN], dupes.line)) + ".")
    return frame[[NAME_COLUMN, "label", "line"]]


def split_train_val(frame: pd.DataFrame, val_size: Union[int, float], seed: int):
    """Stratified, seeded split of labelled images into train and validation.

    Args:
      frame: columns ``name`` and ``label`` (as from `discover`).
      val_size: an integer count, or a fraction in (0, 1). A count is split
        evenly between the classes (the reference write-up's 100/100) when each
        class can give that many while keeping at least as many for training;
        otherwise, and for fractions, each class contributes in proportion.
      seed: the same seed gives the same split on any machine (NumPy's PCG64 on
        names sorted in a fixed order).

    Returns:
      (train, val) frames, each sorted by name.

    Raises:
      ConfigError: if the validation set would be empty or take every image of
        a class.
    """
    n = len(frame)
    if isinstance(val_size, float):
        if not 0 < val_size < 1:
            raise ConfigError(f"--val_size as a fraction must be in (0, 1); got {val_size}.")
        count = int(round(val_size * n))
    else:
        count = int(val_size)
    counts = frame.label.value_counts().sort_index()
    if count < 2 or count > n // 2:
        raise ConfigError(
            f"--val_size={val_size} gives {count} validation images out of {n}, leaving "
            f"{n - count} for training; use a count between 2 and {n // 2} or a fraction "
            "such as --val_size=0.2.")
    half = count // 2
    if isinstance(val_size, int) and count % 2 == 0 and all(counts >= 2 * half):
        per_class = {label: half for label in counts.index}
    else:
        # Largest-remainder apportionment keeps the total exact.
        exact = {label: count * c / n for label, c in counts.items()}
        per_class = {label: int(np.floor(v)) for label, v in exact.items()}
        order = sorted(exact, key=lambda k: exact[k] - per_class[k], reverse=True)
        for label in order[:count - sum(per_class.values())]:
            per_class[label] += 1
    for label, k in per_class.items():
        if k < 1 or k >= counts[label]:
            raise ConfigError(
                f"--val_size={val_size} would put {k} of the {counts[label]} images of class "
                f"{label} in validation; each class needs at least one image on both sides.")
    rng = np.random.default_rng(seed)
    val_names = []
    for label in sorted(per_class):
        names = np.sort(frame.name[frame.label == label].to_numpy(dtype=str))
        val_names.extend(names[rng.permutation(len(names))[:per_class[label]]])
    is_val = frame.name.isin(set(val_names))
    train = frame[~is_val].sort_values("name").reset_index(drop=True)
    val = frame[is_val].sort_values("name").reset_index(drop=True)
    return train, val


def natural_key(name: str):
    """Sort key that puts "2" before "10" (numbers compared as numbers)."""
    import re
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def discover_unlabelled(data_dir: str) -> pd.DataFrame:
    """Images to predict under ``data_dir``, as columns ``path, name`` in output order.

    ``data_dir`` is a Kaggle root (then ``test/`` is predicted and, if
    ``sample_submission.csv`` exists, exactly its names in exactly its row
    order) or a plain folder of images (natural order: 2 before 10).
    """
    if not data_dir or not os.path.isdir(data_dir):
        raise DataError(f"Folder to predict {data_dir!r} does not exist or is not a folder.")
    data_dir = os.path.abspath(data_dir)
    test_dir = os.path.join(data_dir, "test")
    is_kaggle = os.path.isdir(test_dir) and (
        os.path.isfile(os.path.join(data_dir, LABELS_CSV))
        or os.path.isfile(os.path.join(data_dir, SAMPLE_SUBMISSION_CSV))
        or not list_images(data_dir)[0])
    folder = test_dir if is_kaggle else data_dir
    paths, ignored = list_images(folder)
    if ignored:
        logging.info("Ignored %d non-image file(s) in %s.", ignored, folder)
    if not paths:
        raise DataError(f"No images to predict in {folder} (expected files ending in "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case).")
    by_name = _names_to_paths(paths, folder)
    sample = os.path.join(data_dir, SAMPLE_SUBMISSION_CSV)
    if is_kaggle and os.path.isfile(sample):
        rows = read_names_csv(sample, (NAME_COLUMN,))
        names = [image_name(n) if is_image_file(n) else n for n in rows[NAME_COLUMN]]
        missing = [(line, n) for line, n in zip(rows.line, names) if n not in by_name]
        if missing:
            raise DataError(
                f"{sample} lists names with no image in {folder}: " + ", ".join(
                    f"line {line}: {n!r}" for line, n in missing[:_MAX_LISTED])
                + (f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED
                   else "") + ".")
        extra = len(by_name) - len(set(names))
        if extra:
            logging.warning("%d image(s) in %s are not in %s and will not be predicted.",
                            extra, folder, sample)
    else:
        names = sorted(by_name, key=natural_key)
    return pd.DataFrame({"path": [by_name[n] for n in names], "name": names})
