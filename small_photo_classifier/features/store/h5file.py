"""One HDF5 feature-cache file: open-and-verify, index, append, read rows.

`features.store.cache` decides what a cache must hold and fills it; this module is the
file itself (its layout is in `features.store.cache`). Rows are only ever appended,
and ``rows_done`` is advanced after each batch is flushed, so a crash loses at
most the batch being written. Every row carries a CRC32 of its features,
checked whenever rows are read.
"""

import zlib
from typing import Dict, Sequence

import h5py
import numpy as np
import pandas as pd

from small_photo_classifier.features.store.rows import H5Rows
from small_photo_classifier.pipeline import diskspace
from small_photo_classifier.pipeline.errors import DataError

_STR = h5py.string_dtype("utf-8")
INDEX = (("names", _STR), ("paths", _STR), ("identity", _STR), ("labels", np.int8),
         ("view", np.int16), ("row_crc", np.uint32))


def row_key(path: str, identity: str) -> str:
    """The key of one cached row: the image file and its identity (and view)."""
    return f"{path}|{identity}"


def _row_crc(arrays: Sequence[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return crc


class CacheMismatch(Exception):
    """A cache file that cannot be used as a whole; the message says why."""


class CorruptRows(Exception):
    """Rows whose features fail their checksum (``keys``: their row keys)."""

    def __init__(self, path: str, keys: Sequence[str]):
        super().__init__(f"Feature cache {path}: {len(keys)} row(s) fail their checksum, e.g. "
                         f"{keys[0].split('|')[0]}; run again to recompute them.")
        self.keys = list(keys)


class FeatureCache:
    """One open cache file: open-and-verify, index, append, read rows.

    Use `open` (checks provenance, datasets and row count) or `create`; close it
    (or use it as a context manager) when done.
    """

    def __init__(self, f: h5py.File, spec):
        self.file, self.spec, self.path = f, spec, f.filename

    @classmethod
    def open(cls, path: str, spec, mode: str = "r") -> "FeatureCache":
        """Opens ``path`` and checks it was built from ``spec`` (a
        `features.store.cache.CacheSpec`);
        raises `CacheMismatch`."""
        try:
            f = h5py.File(path, mode)
        except (OSError, ValueError) as err:
            raise CacheMismatch(f"cannot be opened as HDF5 ({err})") from err
        try:
            attrs = {k: (v.decode() if isinstance(v, bytes) else str(v))
                     for k, v in f.attrs.items()}
            attrs.setdefault("precision", "float32")  # written before the attribute existed
            diffs = [f"{k}: cached {attrs.get(k)!r}, wanted {v!r}"
                     for k, v in spec.provenance().items() if attrs.get(k) != v]
            if diffs:
                raise CacheMismatch("was built differently (" + "; ".join(diffs) + ")")
            needed = [name for name, _ in INDEX] + list(spec.layers)
            missing = [n for n in needed if n not in f]
            if missing:
                raise CacheMismatch(f"lacks datasets {', '.join(missing)}")
            done = int(f.attrs.get("rows_done", -1))
            if not 0 <= done <= min(len(f[n]) for n in needed):
                raise CacheMismatch(f"has an inconsistent row count {done}")
            return cls(f, spec)
        except CacheMismatch:
            f.close()
            raise
        except Exception as err:  # h5py raises many kinds on damaged files
            f.close()
            raise CacheMismatch(f"is damaged ({type(err).__name__}: {err})") from err

    @classmethod
    def create(cls, path: str, spec, shapes: Dict[str, tuple],
               chunk: int) -> "FeatureCache":
        """A new, empty cache file for ``spec`` with rows of the given feature shapes."""
        f = h5py.File(path, "w")
        for key, value in spec.provenance().items():
            f.attrs[key] = value
        f.attrs["rows_done"] = 0
        for name, dtype in INDEX:
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
        for layer, shape in shapes.items():
            f.create_dataset(layer, shape=(0, *shape), maxshape=(None, *shape),
                             dtype=spec.dtype, chunks=(chunk, *shape))
        return cls(f, spec)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def rows_done(self) -> int:
        return int(self.file.attrs["rows_done"])

    def index(self) -> Dict[str, int]:
        """Row key -> row of every committed row (a later row supersedes an earlier one)."""
        done = self.rows_done
        paths = self.file["paths"].asstr()[:done]
        ident = self.file["identity"].asstr()[:done]
        return {row_key(p, i): row for row, (p, i) in enumerate(zip(paths, ident))}

    def append(self, items: pd.DataFrame, feats: Dict[str, np.ndarray]) -> None:
        """Writes rows for ``items`` (columns path, name, label, view, identity) after
        ``rows_done``, then advances ``rows_done``: a crash in between loses the batch,
        never the file."""
        n = len(items)
        labels = items.label.to_numpy()
        rows = {"names": items.name.to_numpy(dtype=object),
                "paths": items.path.to_numpy(dtype=object),
                "identity": items.identity.to_numpy(dtype=object),
                "labels": np.where((labels >= -1) & (labels < 128), labels, -1).astype(np.int8),
                "view": items.view.to_numpy(np.int16),
                "row_crc": np.array([_row_crc([feats[l][i] for l in self.spec.layers])
                                     for i in range(n)], np.uint32),
                **feats}
        _append(self.file, rows)

    def read(self, keys: Sequence[str], stream: bool = False) -> Dict[str, object]:
        """Features of the rows ``keys`` in that order, by layer: arrays, or with
        ``stream`` `H5Rows` that read on demand. Every row is checked against its CRC
        (streamed: in one bounded pass); failures raise `CorruptRows`.

        Raises:
          DataError: a key is not in the cache.
        """
        index = self.index()
        missing = [k for k in keys if k not in index]
        if missing:
            raise DataError(f"Feature cache {self.path} lacks {len(missing)} image(s), e.g. "
                            f"{missing[0].split('|')[0]}; it changed since extraction. Run "
                            "again.")
        rows = np.array([index[k] for k in keys], np.int64)
        layers = self.spec.layers
        crcs = self.file["row_crc"][:]
        bad = []
        if stream:
            order = np.argsort(rows)
            for start in range(0, len(rows), 256):  # h5py reads increasing indices
                pick = order[start:start + 256]
                blocks = [self.file[l][rows[pick]] for l in layers]
                bad += [keys[i] for j, i in enumerate(pick)
                        if _row_crc([b[j] for b in blocks]) != crcs[rows[i]]]
            out = {l: H5Rows([(self.path, l)], np.zeros(len(rows)), rows) for l in layers}
        else:
            # One contiguous read per layer, then NumPy indexing: h5py's point
            # selection is far slower than reading the whole span.
            lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
            out = {l: self.file[l][lo:hi][rows - lo] for l in layers}
            bad = [keys[i] for i in range(len(rows))
                   if _row_crc([out[l][i] for l in layers]) != crcs[rows[i]]]
        if bad:
            raise CorruptRows(self.path, bad)
        return out


def _append(f: h5py.File, rows: Dict[str, np.ndarray]) -> None:
    """Writes one batch of rows after ``rows_done`` and then advances ``rows_done``."""
    start = int(f.attrs["rows_done"])
    n = len(rows["names"])
    opened = []
    try:
        for name, values in rows.items():
            ds = f[name]
            opened.append(ds)
            if ds.shape[0] < start + n:
                ds.resize(start + n, axis=0)
            ds[start:start + n] = values
        f.flush()  # data first, then the counter that makes it count
        f.attrs["rows_done"] = start + n
        f.flush()
    except BaseException as err:
        keep_open_on_full_disk(err, f, *opened)
        raise


def keep_open_on_full_disk(err: BaseException, *h5_objects) -> None:
    """HDF5 cannot flush onto a full disk: closing or freeing the file would fail again
    and, at exit, crash the interpreter. The exception keeps the objects alive until
    `workflow.base.console.user_errors` reports it and exits without HDF5's cleanup; the rows
    committed before are on disk."""
    if diskspace.disk_full_error(err) is not None:
        err.h5_objects = getattr(err, "h5_objects", ()) + h5_objects
