"""Disk space: check before long work, and turn a full disk into one clear error.

Three layers, because a full disk must never end in a traceback or a crash:

1. `check` compares what a run will write (cache rows, checkpoints, exports), per
   file system, with the free space there, before any long work starts.
2. Writers that grow a file batch by batch (the HDF5 cache) call `ensure_room`
   before each batch and stop cleanly while the file can still be closed:
   HDF5 that hits ENOSPC mid-write cannot flush its metadata any more, and the
   interpreter then crashes at exit (a segmentation fault was seen).
3. Any write that still fails with ENOSPC, EDQUOT or EFBIG (a disk shared with
   other programs fills up at any time) is recognised by `disk_full_error` and
   reported by `workflow.base.console.user_errors` with the file and its file system.
"""

import errno
import os
import re
import shutil
from typing import Iterable, Optional, Tuple

from small_photo_classifier.pipeline.errors import UserError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")
# Kept free beyond the estimate: file-system metadata, logs, small JSON files.
MARGIN_BYTES = 8 << 20


class DiskSpaceError(UserError):
    """Not enough free space for what the run has to write."""


def existing_parent(path: str) -> str:
    """``path`` or its nearest existing ancestor (what will be written is not there yet)."""
    return _up_to(os.path.abspath(path), os.path.exists)


def mount_point(path: str) -> str:
    """The mount point of the file system holding ``path``."""
    return _up_to(existing_parent(path), os.path.ismount)


def _up_to(path: str, found) -> str:
    """``path`` or its nearest ancestor for which ``found`` is true (the root at worst)."""
    while not found(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer can still use on ``path``'s file system."""
    return shutil.disk_usage(existing_parent(path)).free


def human(n: float) -> str:
    """1536 -> "1.5 KB" (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check(needs: Iterable[Tuple[str, int, str]], advice: str = "") -> None:
    """Raises DiskSpaceError when the planned writes do not fit.

    Args:
      needs: ``(what, bytes, path)`` per planned output; grouped by file system.
      advice: what the user can do, appended to the message.
    """
    by_fs = {}
    for what, size, path in needs:
        if size <= 0:
            continue
        mount = mount_point(path)
        entry = by_fs.setdefault(mount, {"items": [], "total": 0, "path": path})
        entry["items"].append((what, size, path))
        entry["total"] += size
    for mount, entry in by_fs.items():
        free = free_bytes(entry["path"])
        if entry["total"] + MARGIN_BYTES <= free:
            continue
        items = "; ".join(f"{what} {human(size)} in {os.path.abspath(p)}"
                          for what, size, p in entry["items"])
        raise DiskSpaceError(
            f"Not enough disk space on the file system mounted at {mount}: this run needs "
            f"about {human(entry['total'])} there ({items}) but only {human(free)} is free. "
            f"Stopped before any long work. {advice}".strip())


def ensure_room(path: str, needed: int, what: str, committed: str = "") -> None:
    """Stops a growing writer before the disk is full (see the module docstring)."""
    free = free_bytes(path)
    if free < needed:
        raise DiskSpaceError(
            f"The disk holding {path} (mounted at {mount_point(path)}) is almost full: "
            f"{human(free)} free, the next {what} needs about {human(needed)}. Stopped "
            f"cleanly{'; ' + committed if committed else ''}. Free some space (or move "
            "--cache_dir to a bigger disk) and rerun: it resumes from what was committed.")


def disk_full_error(err: BaseException) -> Optional[str]:
    """If ``err`` (or its cause) is a failed write to a full disk, the file it names
    (or "" when it names none); else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return err.filename or ""
        text = str(err)
        if any(m in text for m in _MESSAGES) or re.search(r"errno = (28|122|27)\b", text):
            match = re.search(r"filename = '([^']+)'", text)
            return match.group(1) if match else ""
        err = err.__cause__ or err.__context__
    return None


def disk_full_message(filename: str) -> str:
    """The one paragraph a user sees when a write failed on a full disk."""
    where = (f"Writing {filename} failed: the file system mounted at "
             f"{mount_point(filename)} is full ({human(free_bytes(filename))} free)."
             if filename else "A write failed because the disk is full.")
    return (f"{where} Outputs are only ever renamed into place when complete, so no "
            "half-written file was left under its final name; committed cache rows and "
            "fine-tuning checkpoints are kept. Free some space or point --cache_dir / "
            "--workdir / --output at a bigger disk, then rerun: it resumes.")
