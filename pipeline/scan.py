"""Pre-flight check of every image before any long work.

Each file is decoded once, with the same TensorFlow decoder the pipeline uses,
so a file that passes here cannot fail mid-run; all problems are reported
together rather than one per run.
"""

import concurrent.futures
import logging
import os
from typing import List, Sequence, Tuple

import tensorflow as tf

from pipeline import ops
from pipeline.errors import DataError

# Formats the pipeline accepts, by their leading bytes.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_MIN_SIDE = 1


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
        message = err.message.splitlines()[0] if err.message else type(err).__name__
        return f"cannot be decoded as {kind} ({message})"
    height, width = int(image.shape[0]), int(image.shape[1])
    if min(height, width) < _MIN_SIDE:
        return f"has an empty size {height}x{width}"
    return ""


def scan_images(paths: Sequence[str], image_size: int = 224,
                workers: int = 0) -> List[Tuple[str, str]]:
    """Checks every image; returns ``[(path, reason), ...]`` for the bad ones, in input order."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        reasons = list(pool.map(lambda p: check_image(p, image_size), paths))
    return [(p, r) for p, r in zip(paths, reasons) if r]


def format_bad_images(bad: Sequence[Tuple[str, str]], limit: int = 10) -> str:
    """One line per bad image (at most ``limit``), for error messages and logs."""
    lines = [f"  {path}: {reason}" for path, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def require_good_images(paths: Sequence[str], image_size: int = 224) -> None:
    """Raises DataError listing every image that cannot be decoded."""
    logging.info("Checking %d images ...", len(paths))
    bad = scan_images(paths, image_size)
    if bad:
        raise DataError(f"{len(bad)} of {len(paths)} images cannot be used:\n"
                        + format_bad_images(bad)
                        + "\nFix or remove these files and run again.")
