"""Pre-flight check of every image before any long work.

Each file is decoded once, with the same TensorFlow decoder the pipeline uses,
so a file that passes here cannot fail mid-run; all problems are reported
together rather than one per run.
"""

import concurrent.futures
import logging
import os
import re
from typing import List, Sequence, Tuple

import tensorflow as tf

from pipeline import ops
from pipeline.errors import DataError

# Formats the pipeline accepts, by their leading bytes.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_MIN_SIDE = 1


def _clean(err) -> str:
    """TensorFlow's op error without its graph-node prefix and op suffix."""
    message = (err.message or type(err).__name__).splitlines()[0]
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
    return re.sub(r"\s*\[Op:\w+\]", "", message).strip()


def check_image(path: str, image_size: int = 224) -> str:
    """Returns "" if ``path`` decodes to an RGB image, else the reason it does not."""
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not contents:
        return "is empty (0 bytes)"
    kind = next((k for sig, k in _SIGNATURES if contents.startswith(sig)), None)
    if kind is None:
        if contents[:6] in (b"GIF87a", b"GIF89a"):
            return "is a GIF, not a JPEG or PNG photo"
        return "is not a JPEG or PNG file (unrecognised content)"
    try:
        image = ops.decode_image_bytes(contents, image_size)
    except (tf.errors.InvalidArgumentError, tf.errors.OpError) as err:
        return f"cannot be decoded as {kind}: truncated or corrupt ({_clean(err)})"
    height, width = int(image.shape[0]), int(image.shape[1])
    if min(height, width) < _MIN_SIDE:
        return f"has an empty size {height}x{width}"
    return ""


def scan_images(paths: Sequence[str], image_size: int = 224, workers: int = 0,
                progress: bool = False) -> List[Tuple[str, str]]:
    """Checks every image; returns ``[(path, reason), ...]`` for the bad ones, in input order.

    With ``progress``, a progress bar counts the images checked (shown for 100 or more).
    """
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    bar = None
    if progress and len(paths) >= 100:
        import keras
        print(f"Pre-flight check of {len(paths)} images")
        bar = keras.utils.Progbar(len(paths), unit_name="image")
    reasons = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for reason in pool.map(lambda p: check_image(p, image_size), paths):
            reasons.append(reason)
            if bar is not None:
                bar.add(1)
    return [(p, r) for p, r in zip(paths, reasons) if r]


def format_bad_images(bad: Sequence[Tuple[str, str]], limit: int = 10) -> str:
    """One line per bad image (at most ``limit``), for error messages and logs."""
    lines = [f"  {path}: {reason}" for path, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def filter_bad_images(frame, image_size: int, policy: str, report_path: str,
                      keep_rows: bool = False):
    """Applies ``--on_bad_image`` to a frame of images (column ``path``).

    Args:
      policy: "fail" raises DataError listing every bad image; "skip" writes
        ``report_path`` (CSV: path, reason) and leaves them out.
      keep_rows: for prediction: keep every row and mark the bad ones in a
        boolean column ``bad`` instead of dropping them.
    """
    import pandas as pd
    from pipeline.atomic import atomic_path

    bad = scan_images(frame.path.tolist(), image_size, progress=True)
    if keep_rows:
        frame = frame.assign(bad=frame.path.isin({p for p, _ in bad}))
    if not bad:
        return frame
    if policy == "fail":
        raise DataError(f"{len(bad)} of {len(frame)} images cannot be used:\n"
                        + format_bad_images(bad)
                        + "\nFix or remove these files, or pass --on_bad_image=skip to leave "
                        "them out (a report is written to the run folder).")
    with atomic_path(report_path) as tmp:
        pd.DataFrame(bad, columns=["path", "reason"]).to_csv(tmp, index=False)
    logging.warning("Skipping %d bad image(s) of %d; report: %s\n%s", len(bad), len(frame),
                    report_path, format_bad_images(bad))
    if keep_rows:
        return frame
    return frame[~frame.path.isin({p for p, _ in bad})].reset_index(drop=True)
