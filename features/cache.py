"""Frozen VGG16 features computed once and cached in HDF5.

One file per (data folder, backbone configuration). Layout::

    names      [N] str     image names (file name without extension)
    paths      [N] str     absolute image paths (the row key, with ``identity``)
    identity   [N] str     "size:mtime_ns[:view]" of each image when extracted
    labels     [N] int8    0/1 (-1 for unlabelled images)
    view       [N] int16   0 = the plain eval-path image; k >= 1 = k-th augmented view
    row_crc    [N] uint32  CRC32 of the row's features, to detect corruption
    <layer>    [N, ...]    one dataset per cached layer, named by its Keras layer
                           name (block4_pool, block5_pool, fc2), chunked by batch

Provenance (backbone, weights identity, image size, preprocessing, layers, storage
dtype, compute precision, library versions, data folder) lives in the file
attributes and, hashed, in its name; a file whose attributes do not match what
is asked for is rebuilt.

Crash safety: rows are written into ``<name>.partial.h5`` batch by batch and the
attribute ``rows_done`` is advanced only after the batch is flushed, so an
interrupted extraction resumes from the last flushed batch. Only a finished
file is renamed to ``<name>.h5``; readers never see a partial one. Adding
images copies the finished file to a partial one, appends, and renames back.
An exclusive lock file serialises writers sharing one ``--cache_dir``.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from typing import Dict, Sequence

import h5py
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from features import distribute
from features.backbone import Classifier
from pipeline import augment as augment_lib
from pipeline import input as input_lib
from pipeline import diskspace, ops
from pipeline import progress as progress_lib
from pipeline.errors import ConfigError, DataError

FORMAT_VERSION = 1
PREPROCESSING = ("decode(jpeg dct-downscale while >= size; 3 channels) -> "
                 "resize(bilinear, antialias, square) -> vgg_mean_centre(RGB->BGR minus "
                 "ImageNet means 103.939,116.779,123.68; no scaling)")
CACHE_DTYPES = ("float16", "float32")
_STR = h5py.string_dtype("utf-8")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Everything a cache's contents depend on, apart from the images themselves."""
    weights_id: str
    include_top: bool
    image_size: int
    layers: tuple
    dtype: str = "float32"
    data_dir: str = ""
    augment: str = "none"     # preset of the augmented views (views > 0 only)
    precision: str = "float32"  # Keras policy the features were computed in


    def __post_init__(self):
        if self.dtype not in CACHE_DTYPES:
            raise ConfigError(f"--cache_dtype={self.dtype!r}: choose one of "
                              f"{', '.join(CACHE_DTYPES)}.")

    def provenance(self) -> Dict[str, str]:
        """Attributes stored with the cache and compared on reuse."""
        return {
            "format_version": str(FORMAT_VERSION),
            "backbone": "keras.applications.VGG16",
            "weights": self.weights_id,
            "include_top": str(self.include_top),
            "image_size": str(self.image_size),
            "preprocessing": PREPROCESSING,
            "layers": ",".join(self.layers),
            "dtype": self.dtype,
            "data_dir": os.path.abspath(self.data_dir),
            "augment": self.augment,
            "precision": self.precision,
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
            "h5py_version": h5py.__version__,
        }

    def file_name(self) -> str:
        """Readable, unique name: what matters at a glance plus a hash of everything."""
        # float32 is left out of the hash so caches made before precision was recorded
        # (all float32) keep their names and stay valid.
        hashed = {k: v for k, v in self.provenance().items() if not k.endswith("_version")
                  and not (k == "precision" and v == "float32")}
        digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:12]
        weights = self.weights_id.split(":")[0].split("(")[0]
        data = os.path.basename(os.path.abspath(self.data_dir).rstrip(os.sep)) or "data"
        aug = "" if self.augment == "none" else f"-aug_{self.augment}"
        computed = "" if self.precision == "float32" else f"-{self.precision}"
        return (f"vgg16-{data}-{self.image_size}px-{weights}-"
                f"{'top' if self.include_top else 'notop'}-{self.dtype}{computed}{aug}-"
                f"{digest}.h5")


def cached_layers(include_top: bool) -> tuple:
    """The layers every cache holds: each scenario's start layer (from the scenario table)
    plus ``block5_pool`` (the linear probe's input), in network order.

    Without the ImageNet top: block4_pool (C), block5_pool (A, B); with it also fc2 (A).
    """
    from features.backbone import SCENARIOS
    wanted = {s.start_layer(include_top) for s in SCENARIOS.values()} | {"block5_pool"}
    return tuple(layer for layer in ("block4_pool", "block5_pool", "fc2") if layer in wanted)


def image_identity(path: str, view: int = 0) -> str:
    """Changes when the file changes (size or modification time)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}" + (f":{view}" if view else "")


def _row_crc(arrays: Sequence[np.ndarray]) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).tobytes(), crc)
    return crc


@contextlib.contextmanager
def _lock(path: str):
    """Exclusive advisory lock held while a cache file is being written."""
    with open(path + ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("Another run is writing %s; waiting for it ...", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _CorruptCache(Exception):
    pass


def _open_checked(path: str, spec: CacheSpec, mode="r"):
    """Opens a cache file and checks its provenance; raises _CorruptCache with the reason."""
    try:
        f = h5py.File(path, mode)
    except (OSError, ValueError) as err:
        raise _CorruptCache(f"cannot be opened as HDF5 ({err})") from err
    try:
        attrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.attrs.items()}
        attrs.setdefault("precision", "float32")  # written before the attribute existed
        expected = spec.provenance()
        diffs = [f"{k}: cached {attrs.get(k)!r}, wanted {v!r}" for k, v in expected.items()
                 if attrs.get(k) != v]
        if diffs:
            raise _CorruptCache("was built differently (" + "; ".join(diffs) + ")")
        needed = ["names", "paths", "identity", "labels", "view", "row_crc", *spec.layers]
        missing = [n for n in needed if n not in f]
        if missing:
            raise _CorruptCache(f"lacks datasets {', '.join(missing)}")
        done = int(f.attrs.get("rows_done", -1))
        if not 0 <= done <= min(len(f[n]) for n in needed):
            raise _CorruptCache(f"has an inconsistent row count {done}")
        return f
    except _CorruptCache:
        f.close()
        raise
    except Exception as err:  # h5py raises many kinds on damaged files
        f.close()
        raise _CorruptCache(f"is damaged ({type(err).__name__}: {err})") from err


def _create(path: str, spec: CacheSpec, feature_shapes: Dict[str, tuple], chunk: int):
    f = h5py.File(path, "w")
    for key, value in spec.provenance().items():
        f.attrs[key] = value
    f.attrs["rows_done"] = 0
    for name, dtype in (("names", _STR), ("paths", _STR), ("identity", _STR),
                        ("labels", np.int8), ("view", np.int16), ("row_crc", np.uint32)):
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
    for layer, shape in feature_shapes.items():
        f.create_dataset(layer, shape=(0, *shape), maxshape=(None, *shape), dtype=spec.dtype,
                         chunks=(chunk, *shape))
    return f


def _append(f, rows: Dict[str, np.ndarray], layers: Sequence[str]):
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
        if diskspace.disk_full_error(err) is not None:
            _UNCLOSABLE.extend(opened)  # freeing them would fail again (see ensure_features)
        raise


def _valid_rows(f, layers: Sequence[str], verify: bool) -> Dict[str, int]:
    """Maps "path|identity" to row index for rows that are complete (and intact)."""
    done = int(f.attrs["rows_done"])
    paths = f["paths"].asstr()[:done]
    ident = f["identity"].asstr()[:done]
    rows = {}
    bad = 0
    crcs = f["row_crc"][:done]
    for start in range(0, done, 256):
        stop = min(done, start + 256)
        blocks = [f[layer][start:stop] for layer in layers] if verify else None
        for i in range(start, stop):
            if verify and _row_crc([b[i - start] for b in blocks]) != int(crcs[i]):
                bad += 1
                continue
            rows[f"{paths[i]}|{ident[i]}"] = i
    if bad:
        logging.warning("Cache %s: %d row(s) fail their checksum and will be recomputed.",
                        f.filename, bad)
    return rows


def _extraction_dataset(items: pd.DataFrame, image_size: int, batch_size: int,
                        preset_name: str):
    """The eval path, plus (for views > 0) a per-image seeded augmentation."""
    if preset_name == "none" or (items.view == 0).all():
        ds = input_lib.eval_dataset(items.path.tolist(), items.label.tolist(),
                                    items.name.tolist(), image_size, batch_size)
        return ds
    preset = augment_lib.get_preset(preset_name)
    front = input_lib.decode_and_resize(image_size)

    def augment_one(element):
        # Seed from (name, view): the same view of the same image is identical
        # whenever it is (re)computed, e.g. after a resume.
        seed = tf.stack([tf.strings.to_hash_bucket_fast(element["name"], 2**31 - 1),
                         tf.cast(element["view"], tf.int64)])
        image = augment_lib.augment_batch(element["image"][None], preset, seed)[0]
        image = tf.where(element["view"] > 0, image, element["image"])
        return {**element, "image": ops.vgg_mean_centre_image(image)}

    source = tf.data.Dataset.from_tensor_slices({
        "path": items.path.tolist(), "label": items.label.astype(np.float32).tolist(),
        "name": items.name.tolist(), "view": items.view.astype(np.int64).tolist()})
    return (source.map(ops.chain(front, augment_one), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


_UNCLOSABLE = []  # files that hit a full disk (see ensure_features)


@dataclasses.dataclass
class CacheResult:
    path: str
    reused: int
    computed: int
    seconds: float


def ensure_features(classifier: Classifier, spec: CacheSpec, frame: pd.DataFrame,
                    cache_dir: str, batch_size: int = 32, views: int = 0,
                    progress: bool = True, engine=None) -> CacheResult:
    """Makes sure the cache holds features of every image in ``frame``; returns its path.

    Args:
      classifier: supplies the frozen layers (its weights must match ``spec``).
      spec: what the cache is built from.
      frame: columns ``path, name`` and optionally ``label``.
      cache_dir: folder of cache files (created if needed).
      views: 0 caches the plain eval-path image; K >= 1 caches K augmented
        views of each image (``spec.augment`` preset) instead.
      engine: where the rows are computed: None for this process, or a
        `features.ray_engine.RayEngine` (the rows stream back here and are
        written exactly as local ones, with the same resume and checksums).

    Only images whose rows are missing, changed (size/mtime) or corrupt are
    computed; a cache built from anything else is rebuilt, with the reason logged.
    """
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, spec.file_name())
    partial = path[:-3] + ".partial.h5"
    items = _items(frame, views)
    started = time.perf_counter()
    with _lock(path):
        # 1. What a finished file already has.
        have = {}
        if os.path.exists(path):
            try:
                with _open_checked(path, spec) as f:
                    have = _valid_rows(f, spec.layers, verify=True)
                    total = int(f.attrs["rows_done"])
                if len(have) < total:
                    raise _CorruptCache(f"has {total - len(have)} corrupt row(s)")
            except _CorruptCache as why:
                logging.warning("Cache %s %s: rebuilding it.", path, why)
                os.remove(path)
                have = {}
        keys = items.path + "|" + items.identity
        todo = items[~keys.isin(set(have))]
        if todo.empty:
            logging.info("Feature cache hit: %s (%d images).", path, len(items))
            return CacheResult(path, len(items), 0, time.perf_counter() - started)
        # 2. Resume a partial file, or start one (from the finished file, if any).
        f = None
        if os.path.exists(partial):
            try:
                f = _open_checked(partial, spec, mode="r+")
                logging.info("Resuming the interrupted extraction in %s (%d rows done).",
                             partial, int(f.attrs["rows_done"]))
            except _CorruptCache as why:
                logging.warning("Partial cache %s %s: starting it again.", partial, why)
                os.remove(partial)
        if f is None and have:
            try:
                shutil.copyfile(path, partial + ".copy")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(partial + ".copy")  # never leave a torn copy behind
                raise
            os.replace(partial + ".copy", partial)
            f = _open_checked(partial, spec, mode="r+")
        try:
            if f is not None:
                done = _valid_rows(f, spec.layers, verify=False)
                todo = todo[~(todo.path + "|" + todo.identity).isin(set(done))]
            logging.info("Extracting %s for %d image(s)%s into %s.", ", ".join(spec.layers),
                         len(todo), f" ({len(items) - len(todo)} already cached)"
                         if len(todo) < len(items) else "", path)
            f = _extract_into(f, partial, classifier, spec, todo, batch_size, progress,
                              engine)
            f.attrs["complete"] = True
            f.close()
            f = None
            os.replace(partial, path)
            progress_lib.clear("extraction")
        except BaseException as err:
            if f is not None and diskspace.disk_full_error(err) is not None:
                # HDF5 cannot flush onto a full disk: closing (or freeing) the file would
                # fail again, and at exit crash the interpreter. Keep it open; the rows
                # committed before are on disk, and the CLI exits without HDF5's cleanup.
                _UNCLOSABLE.append(f)
                f = None
            raise
        finally:
            if f is not None:
                f.close()
    return CacheResult(path, len(items) - len(todo), len(todo), time.perf_counter() - started)


def _items(frame: pd.DataFrame, views: int) -> pd.DataFrame:
    base = pd.DataFrame({
        "path": [os.path.abspath(p) for p in frame.path],
        "name": frame.name.astype(str).tolist(),
        "label": frame.label.astype(int).tolist() if "label" in frame else -1,
    })
    view_ids = [0] if views == 0 else list(range(1, views + 1))
    items = pd.concat([base.assign(view=v) for v in view_ids], ignore_index=True)
    try:
        items["identity"] = [image_identity(p, v) for p, v in zip(items.path, items.view)]
    except FileNotFoundError as err:
        raise DataError(f"Image {err.filename} disappeared while the run was starting.") from err
    return items


def compute_features(predict, items: pd.DataFrame, spec: CacheSpec, batch_size: int):
    """Yields ``(rows of items, {layer: features})`` batch by batch, in order.

    ``predict`` maps a batch of mean-centred images to the dict of ``spec.layers``
    outputs. Used on this machine and, unchanged, inside Ray workers, so both
    compute the same rows.
    """
    offset = 0
    for batch in _extraction_dataset(items, spec.image_size, batch_size, spec.augment):
        n = int(batch["image"].shape[0])
        outputs = predict(batch["image"])
        yield items.iloc[offset:offset + n], {l: np.asarray(outputs[l]) for l in spec.layers}
        offset += n


def _local_batches(classifier, spec, todo, batch_size):
    computes_in = classifier.stem.get_layer("block1_conv1").dtype_policy.name
    if computes_in != spec.precision:
        # The provenance must say how the rows were really computed.
        raise ConfigError(f"The backbone computes in {computes_in} but the cache is for "
                          f"{spec.precision}; build the classifier after setting the precision.")
    model = classifier.feature_model(spec.layers)
    # Split over the replicas of a mirrored strategy (one device otherwise).
    predict = distribute.sharded(lambda x: model(x, training=False))
    return compute_features(predict, todo, spec, batch_size)


def _extract_into(f, partial, classifier, spec, todo, batch_size, progress, engine=None):
    if todo.empty:
        return f
    shapes = layer_shapes(classifier, spec.layers)
    if f is None:
        f = _create(partial, spec, shapes, chunk=batch_size)
    source = (engine.feature_batches(spec, todo, batch_size) if engine is not None
              else _local_batches(classifier, spec, todo, batch_size))
    bar = keras.utils.Progbar(len(todo), unit_name="image") if progress else None
    per_row = row_bytes(shapes, spec.dtype)
    total = int(f.attrs["rows_done"]) + len(todo)
    for chunk, outputs in source:
        n = len(chunk)
        done = int(f.attrs["rows_done"])
        # Stop while HDF5 can still close the file (see pipeline.diskspace); a chunk
        # of `batch_size` rows per dataset may be allocated at once.
        diskspace.ensure_room(partial, 2 * max(n, batch_size) * per_row + (1 << 20),
                              "batch of cached features",
                              f"{done} of {total} rows are committed in {partial}")
        feats = {}
        for layer in spec.layers:
            values = outputs[layer].astype(spec.dtype)
            if not np.all(np.isfinite(values)):
                raise ConfigError(
                    f"Features of layer {layer} overflow {spec.dtype} for images such as "
                    f"{chunk.path.iloc[0]}; use --cache_dtype=float32.")
            feats[layer] = values
        rows = {
            "names": chunk.name.to_numpy(dtype=object),
            "paths": chunk.path.to_numpy(dtype=object),
            "identity": chunk.identity.to_numpy(dtype=object),
            "labels": chunk.label.to_numpy(np.int8),
            "view": chunk.view.to_numpy(np.int16),
            "row_crc": np.array([_row_crc([feats[l][i] for l in spec.layers])
                                 for i in range(n)], np.uint32),
            **feats,
        }
        _append(f, rows, spec.layers)
        progress_lib.report("extraction", f"resume the feature extraction: {done + n} of "
                                          f"{total} rows are committed in {partial}")
        if bar is not None:
            bar.add(n)
    return f


def layer_shapes(classifier: Classifier, layers: Sequence[str]) -> Dict[str, tuple]:
    """Per-image shape of each named layer's output (one row of the cache)."""
    model = classifier.feature_model(layers)
    return {name: tuple(model.output[name].shape[1:]) for name in layers}


def row_bytes(shapes: Dict[str, tuple], dtype: str) -> int:
    """Bytes one cache row takes on disk: its features plus about 200 bytes of index."""
    item = np.dtype(dtype).itemsize
    return sum(int(np.prod(shape)) * item for shape in shapes.values()) + 200


def planned_bytes(classifier: Classifier, spec: CacheSpec, frame: pd.DataFrame,
                  cache_dir: str, views: int = 0) -> int:
    """What `ensure_features` would write for ``frame``: its missing rows, plus a copy
    of the finished file when rows are added to it (the append happens in a copy)."""
    shapes = layer_shapes(classifier, spec.layers)
    path = os.path.join(cache_dir, spec.file_name())
    rows = len(frame) * max(views, 1)
    existing = 0
    if os.path.exists(path):
        try:
            with _open_checked(path, spec) as f:
                have = _valid_rows(f, spec.layers, verify=False)
            keys = _items(frame, views)
            rows = int((~(keys.path + "|" + keys.identity).isin(set(have))).sum())
            existing = os.path.getsize(path) if rows else 0
        except _CorruptCache:
            pass  # it will be rebuilt: count every row
    return rows * row_bytes(shapes, spec.dtype) + existing


class H5Rows:
    """Rows of cached features read from HDF5 on demand: an array-like for data larger
    than memory.

    ``x[rows]`` (an index array or a slice) reads just those rows and returns a
    float32 NumPy array, in the order asked; `take` and `concat` build new views
    without reading. Each source is a (file, dataset) pair, so plain rows and
    cached augmented views of another file combine into one training set.
    """

    def __init__(self, sources, source, row):
        self.sources = list(sources)
        self.source = np.asarray(source, np.int64)
        self.row = np.asarray(row, np.int64)
        self._files = {}
        path, name = self.sources[0]
        self.shape = (len(self.row), *self._dataset(path, name).shape[1:])
        self.ndim, self.dtype = len(self.shape), np.dtype(np.float32)

    def _dataset(self, path, name):
        if path not in self._files:
            self._files[path] = h5py.File(path, "r")
        return self._files[path][name]

    def __len__(self):
        return len(self.row)

    def __getitem__(self, key) -> np.ndarray:
        source, row = self.source[key], self.row[key]
        out = np.empty((len(row), *self.shape[1:]), np.float32)
        for s in np.unique(source):
            pick = np.flatnonzero(source == s)
            wanted = row[pick]
            unique = np.unique(wanted)  # h5py reads increasing indices only
            block = self._dataset(*self.sources[s])[unique]
            out[pick] = block[np.searchsorted(unique, wanted)]
        return out

    def __array__(self, dtype=None, copy=None):
        values = self[:]
        return values if dtype is None else values.astype(dtype)

    def take(self, rows) -> "H5Rows":
        """A view of the given rows (nothing is read)."""
        return H5Rows(self.sources, self.source[rows], self.row[rows])

    @staticmethod
    def concat(parts) -> "H5Rows":
        """The rows of ``parts`` one after the other (nothing is read)."""
        sources, source, row = [], [], []
        for part in parts:
            remap = []
            for src in part.sources:
                if src not in sources:
                    sources.append(src)
                remap.append(sources.index(src))
            source.append(np.asarray(remap, np.int64)[part.source])
            row.append(part.row)
        return H5Rows(sources, np.concatenate(source), np.concatenate(row))

    def __getstate__(self):  # picklable (Ray, multiprocessing): files reopen lazily
        return {**self.__dict__, "_files": {}}


def feature_bytes(shapes: Dict[str, tuple], rows: int) -> int:
    """Memory that ``rows`` rows of every cached layer take as float32 arrays."""
    return rows * sum(int(np.prod(shape)) * 4 for shape in shapes.values())


def load_features(cache_path: str, spec: CacheSpec, frame: pd.DataFrame,
                  layers: Sequence[str], views: int = 0, stream: bool = False):
    """Features of the images in ``frame`` (in its row order), for the given layers.

    With ``views`` >= 1 the result has ``len(frame) * views`` rows, view-major.
    Rows are verified against their checksums. With ``stream`` the result holds
    `H5Rows` views instead of arrays (rows are read when used; the checksums are
    verified in one pass of bounded memory).

    Raises:
      DataError: an image in ``frame`` is not in the cache (call
        `ensure_features` first), or a row is corrupt.
    """
    items = _items(frame, views)
    try:
        f = _open_checked(cache_path, spec)
    except _CorruptCache as why:
        raise DataError(f"Feature cache {cache_path} {why}; run again to rebuild it.") from None
    with f:
        index = _valid_rows(f, spec.layers, verify=False)
        keys = (items.path + "|" + items.identity).tolist()
        missing = [k.split("|")[0] for k in keys if k not in index]
        if missing:
            raise DataError(f"Feature cache {cache_path} lacks {len(missing)} image(s), e.g. "
                            f"{missing[0]}; it changed since extraction. Run again.")
        rows = np.array([index[k] for k in keys], np.int64)
        if stream:
            _verify_rows(f, spec, rows, items, cache_path)
            return {layer: H5Rows([(cache_path, layer)], np.zeros(len(rows)), rows)
                    for layer in layers}
        # One contiguous read per layer, then NumPy indexing: h5py's point
        # selection is far slower than reading the whole span.
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        out = {layer: f[layer][lo:hi][rows - lo] for layer in spec.layers}
        crcs = f["row_crc"][lo:hi][rows - lo]
    for i, crc in enumerate(crcs):
        if _row_crc([out[l][i] for l in spec.layers]) != int(crc):
            raise DataError(f"Feature cache {cache_path}: row for {items.path.iloc[i]} is "
                            "corrupt; run again to recompute it.")
    return {layer: out[layer] for layer in layers}


def _verify_rows(f, spec, rows, items, cache_path, chunk: int = 256):
    """Checks the rows' checksums reading ``chunk`` rows at a time."""
    order = np.argsort(rows)
    crcs = f["row_crc"][:]
    for start in range(0, len(rows), chunk):
        pick = order[start:start + chunk]
        wanted = rows[pick]
        blocks = {l: f[l][wanted] for l in spec.layers}  # increasing: argsort order
        for j, i in enumerate(pick):
            if _row_crc([blocks[l][j] for l in spec.layers]) != int(crcs[wanted[j]]):
                raise DataError(f"Feature cache {cache_path}: row for {items.path.iloc[i]} "
                                "is corrupt; run again to recompute it.")
