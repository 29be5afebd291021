"""Writing files so that a crash never leaves a half-written output behind.

Everything is written to a unique temporary name in the destination folder and
renamed into place (``os.replace`` is atomic on POSIX within one file system).
"""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to ``path``; on success renames it to ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    The temporary name is unique, so concurrent writers never share one, and it
    keeps the destination's extension (Keras and h5py look at extensions).
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    # The ".tmp-" prefix marks it as incomplete; the suffix keeps ".weights.h5" etc.
    suffix = base[base.index("."):] if "." in base else ""
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{base}-", suffix=suffix, dir=folder)
    os.close(fd)
    # mkstemp creates 0600; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_link(src: str, dst: str) -> None:
    """Makes ``dst`` another name of ``src``'s file, atomically: a hard link, so the bytes
    are on disk once (every writer here renames a new file into place, so neither name
    ever changes under the other); a copy where the file system has no hard links."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        # Already so; and renaming one link onto another of the same file is a no-op
        # that would leave the temporary name behind (POSIX rename).
        return
    with atomic_path(dst) as tmp:
        os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
