"""Pre-flight check of every image before any long work.

Each file's size is read from its header first (an image of more than ``--max_pixels``
is refused before anything is decoded), then it is decoded once, with the same
TensorFlow decoder the pipeline uses, so a file that passes here cannot fail mid-run;
all problems are reported together rather than one per run.
"""

import concurrent.futures
import logging
import os
import re
from typing import List, Sequence, Tuple

import tensorflow as tf

from small_photo_classifier.pipeline import ops
from small_photo_classifier.pipeline.limits import MAX_PIXELS
from small_photo_classifier.pipeline import progress as progress_lib
from small_photo_classifier.pipeline.errors import DataError

# Formats the pipeline accepts, by their leading bytes.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
_MIN_SIDE = 1
# What the check looks at: a pre-flight memo written by another version (or with another
# limit) is not trusted.
CHECK_VERSION = 2


def dimensions(contents: bytes):
    """(width, height) of a JPEG or PNG from its header alone (nothing is decoded), or
    None when the header does not say."""
    if contents.startswith(b"\x89PNG\r\n\x1a\n") and contents[12:16] == b"IHDR":
        return (int.from_bytes(contents[16:20], "big"), int.from_bytes(contents[20:24], "big"))
    if contents.startswith(b"\xff\xd8\xff"):
        try:
            height, width, _ = tf.image.extract_jpeg_shape(contents).numpy().tolist()
        except (tf.errors.InvalidArgumentError, tf.errors.OpError):
            return None
        return width, height
    return None


def unreadable_size(contents: bytes) -> str:
    """Why a JPEG or PNG's header does not give its size (a check that cannot read it
    fails closed: such a file is never decoded), or ""."""
    if dimensions(contents) is not None:
        return ""
    kind = "PNG" if contents.startswith(b"\x89PNG") else "JPEG"
    return (f"has a {kind} header that does not give its size (truncated or damaged "
            "before its first frame): not decoded")


def too_many_pixels(contents: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """The reason an image is refused for its size (from its header), or "" (also when
    the header does not say: `unreadable_size` refuses that)."""
    size = dimensions(contents)
    if size is None or size[0] * size[1] <= max_pixels:
        return ""
    return (f"is {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} megapixels, over the "
            f"limit of {max_pixels / 1e6:g} (--max_pixels): not decoded (no camera photo "
            "is that large; such a file is a decompression bomb or not a photo)")


def clean_error(err) -> str:
    """TensorFlow's op error without its graph-node prefix and op suffix."""
    message = (err.message or type(err).__name__).splitlines()[0]
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
    return re.sub(r"\s*\[Op:\w+\]", "", message).strip()


def signature_problem(contents: bytes) -> str:
    """Why ``contents`` is not a JPEG or PNG file by its leading bytes, or ""."""
    if not contents:
        return "is empty (0 bytes)"
    if any(contents.startswith(sig) for sig, _ in _SIGNATURES):
        return ""
    if contents[:6] in (b"GIF87a", b"GIF89a"):
        return "is a GIF, not a JPEG or PNG photo"
    return "is not a JPEG or PNG file (unrecognised content)"


# How much of a file the header checks read: a JPEG's frame header follows its EXIF and
# colour-profile segments (64 KB each at most), so 1 MB holds it in any camera's file.
HEADER_BYTES = 1 << 20


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image of ``max_pixels`` can honestly be: 4 bytes a pixel (a
    PNG with alpha stored raw) plus 1 MB of headers and metadata."""
    return 4 * max_pixels + HEADER_BYTES


def check_image(path: str, image_size: int = 224, max_pixels: int = MAX_PIXELS) -> str:
    """Returns "" if ``path`` decodes to an RGB image of at most ``max_pixels`` pixels,
    else the reason it does not. The size checks read at most `HEADER_BYTES` (the file's
    byte size, then the pixel count from its header: a file over either limit, or one
    whose header does not say its size, is never read whole nor decoded)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_BYTES)
            problem = (signature_problem(head) or unreadable_size(head)
                       or too_many_pixels(head, max_pixels))
            if not problem and size > max_file_bytes(max_pixels):
                problem = (f"is {size / 1e6:.0f} MB, more than an image of "
                           f"{max_pixels / 1e6:g} megapixels can be (--max_pixels): not read")
            if problem:
                return problem
            contents = head + f.read()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    kind = next(k for sig, k in _SIGNATURES if contents.startswith(sig))
    try:
        image = ops.decode_image_bytes(contents, image_size)
    except (tf.errors.InvalidArgumentError, tf.errors.OpError) as err:
        return f"cannot be decoded as {kind}: truncated or corrupt ({clean_error(err)})"
    height, width = int(image.shape[0]), int(image.shape[1])
    if min(height, width) < _MIN_SIDE:
        return f"has an empty size {height}x{width}"
    return ""


def scan_images(paths: Sequence[str], image_size: int = 224, workers: int = 0,
                progress: bool = False, max_pixels: int = MAX_PIXELS) -> List[Tuple[str, str]]:
    """Checks every image; returns ``[(path, reason), ...]`` for the bad ones, in input order.

    With ``progress``, a progress bar counts the images checked (shown for 100 or more).
    """
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    bar = None
    if progress and len(paths) >= 100:
        print(f"Pre-flight check of {len(paths)} images")
        bar = progress_lib.bar(len(paths), "image", "pre-flight check")
    reasons = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for reason in pool.map(lambda p: check_image(p, image_size, max_pixels), paths):
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


def _identity(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{os.path.abspath(path)}|{st.st_size}:{st.st_mtime_ns}"


def scan_with_memo(paths: Sequence[str], image_size: int, memo_path: str = None,
                   progress: bool = True, max_pixels: int = MAX_PIXELS) -> List[Tuple[str, str]]:
    """`scan_images`, remembering in ``memo_path`` (JSON) the images that decoded.

    Decoding every photo costs ~10 ms each on 2 cores (~20 s for the Kaggle set)
    on every run; an image whose size and modification time are unchanged since
    it passed needs no second check. Bad images are always checked again (they
    may have been fixed), and the memo is rewritten atomically.
    """
    if not memo_path:
        return scan_images(paths, image_size, progress=progress, max_pixels=max_pixels)
    import json
    from small_photo_classifier.pipeline.atomic import atomic_write_text
    checked_by = {"check": CHECK_VERSION, "max_pixels": max_pixels}
    try:
        with open(memo_path, encoding="utf-8") as f:
            memo = json.load(f)
        # Images that passed another check (an older version, another limit) are
        # checked again.
        known = (set(memo.get("ok", [])) if {k: memo.get(k) for k in checked_by} == checked_by
                 else set())
    except (OSError, ValueError, AttributeError):
        known = set()  # missing or damaged: check everything
    ids = {p: _identity(p) for p in paths}
    todo = [p for p in paths if not ids[p] or ids[p] not in known]
    bad = scan_images(todo, image_size, progress=progress, max_pixels=max_pixels)
    if todo:
        failed = {p for p, _ in bad}
        known |= {ids[p] for p in todo if ids[p] and p not in failed}
        try:
            atomic_write_text(memo_path, json.dumps({**checked_by, "ok": sorted(known)}))
        except OSError as err:  # a memo is an optimisation: never fail the run for it
            logging.warning("Could not write the pre-flight memo %s (%s).", memo_path, err)
    else:
        logging.info("Pre-flight: all %d images unchanged since they were checked (%s).",
                     len(paths), memo_path)
    return bad


def filter_bad_images(frame, image_size: int, policy: str, report_path: str,
                      keep_rows: bool = False, memo_path: str = None,
                      max_pixels: int = MAX_PIXELS):
    """Applies ``--on_bad_image`` to a frame of images (column ``path``).

    Args:
      policy: "fail" raises DataError listing every bad image; "skip" writes
        ``report_path`` (CSV: path, reason) and leaves them out.
      keep_rows: for prediction: keep every row and mark the bad ones in a
        boolean column ``bad`` (and their reason in ``reason``) instead of dropping them.
      memo_path: remember the images that passed (see `scan_with_memo`).
      max_pixels: an image with more pixels (from its header) is bad, never decoded.
    """
    import pandas as pd
    from small_photo_classifier.pipeline.atomic import atomic_path

    bad = scan_with_memo(frame.path.tolist(), image_size, memo_path, max_pixels=max_pixels)
    if keep_rows:
        why = dict(bad)
        frame = frame.assign(bad=frame.path.isin(why),
                             reason=[why.get(p, "") for p in frame.path])
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
