"""Frozen backbone features computed once and cached in HDF5.

One file per (data folder, backbone configuration). Layout::

    names      [N] str     image names (file name without extension)
    paths      [N] str     absolute image paths (the row key, with ``identity``)
    identity   [N] str     "size:mtime_ns[:view]" of each image when extracted
    labels     [N] int8    the label when it fits (binary, < 128 classes), else -1
    view       [N] int16   0 = the plain eval-path image; k >= 1 = k-th augmented view
    row_crc    [N] uint32  CRC32 of the row's features, to detect corruption
    <layer>    [N, ...]    one dataset per cached layer, named by its Keras layer
                           name (VGG16: block4_pool, block5_pool, fc2), chunked by batch

Provenance (backbone, weights identity, image size, preprocessing, layers, storage
dtype, compute precision, library versions, data folder) lives in the file
attributes and, hashed, in its name; a file whose attributes do not match what
is asked for is rebuilt, with the reason logged.

Integrity is per row: rows are checked against their CRC when they are read
(`FeatureCache.read`), and `load` recomputes just the rows that fail, which are
appended again and supersede the damaged ones. A file that cannot be opened,
lacks datasets or has an inconsistent row count is rebuilt as a whole.

Crash safety: rows are written into ``<name>.partial.h5`` batch by batch and the
attribute ``rows_done`` is advanced only after the batch is flushed, so an
interrupted extraction resumes from the last flushed batch. Only a finished
file is renamed to ``<name>.h5``; readers never see a partial one. Adding
images copies the finished file to a partial one, appends, and renames back.
An exclusive lock file serialises writers sharing one ``--cache_dir``.

This module says what a cache holds and keeps it filled (`ensure_features`,
`load`); one file's reading and writing is `features.store.h5file.FeatureCache`. It is
a little over 400 lines because extraction (the images -> rows path, local or on
Ray) belongs with the orchestration that decides which rows to extract.
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
from typing import Dict, Iterable, Optional, Sequence

import h5py
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from small_photo_classifier.features import backbone, networks, scenarios
from small_photo_classifier.features.store import extract
from small_photo_classifier.features.store.h5file import (CacheMismatch, CorruptRows, FeatureCache,
                                                          keep_open_on_full_disk)
from small_photo_classifier.pipeline import diskspace, run_info
from small_photo_classifier.pipeline import progress as progress_lib
from small_photo_classifier.pipeline.errors import ConfigError, DataError

FORMAT_VERSION = 1
# Part of every cache file's provenance: the same words as the files already written.
PREPROCESSING = ("decode(jpeg dct-downscale while >= size; 3 channels) -> "
                 "resize(bilinear, antialias, square) -> vgg_mean_centre(RGB->BGR minus "
                 "ImageNet means " + ",".join(f"{m:g}" for m in run_info.MEANS_BGR)
                 + "; no scaling)")
CACHE_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Everything a cache's contents depend on, apart from the images themselves."""
    weights_id: str
    include_top: bool
    image_size: int
    dtype: str = "float32"
    data_dir: str = ""
    augment: str = "none"     # preset of the augmented views (views > 0 only)
    precision: str = "float32"  # Keras policy the features were computed in
    layers: tuple = ()        # () = `cached_layers(include_top, net)`, what every run caches
    # The backbone computing the features: always named (None only to keep the fields'
    # order; a spec without one is refused, never taken for VGG16's).
    net: Optional[networks.Backbone] = None

    def __post_init__(self):
        if self.net is None:
            raise ValueError("CacheSpec needs net: the backbone whose features it holds.")
        if not self.layers:
            object.__setattr__(self, "layers", cached_layers(self.include_top, self.net))
        if self.dtype not in CACHE_DTYPES:
            raise ConfigError(f"--cache_dtype={self.dtype!r}: choose one of "
                              f"{', '.join(CACHE_DTYPES)}.")

    def provenance(self) -> Dict[str, str]:
        """Attributes stored with the cache and compared on reuse."""
        return {
            "format_version": str(FORMAT_VERSION),
            "backbone": self.net.source,
            "weights": self.weights_id,
            "include_top": str(self.include_top),
            "image_size": str(self.image_size),
            "preprocessing": preprocessing(self.net),
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
        hashed = {k: v for k, v in self.provenance().items() if not k.endswith("_version")}
        digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:12]
        weights = self.weights_id.split(":")[0].split("(")[0]
        data = os.path.basename(os.path.abspath(self.data_dir).rstrip(os.sep)) or "data"
        aug = "" if self.augment == "none" else f"-aug_{self.augment}"
        computed = "" if self.precision == "float32" else f"-{self.precision}"
        return (f"{self.net.slug}-{data}-{self.image_size}px-{weights}-"
                f"{'top' if self.include_top else 'notop'}-{self.dtype}{computed}{aug}-"
                f"{digest}.h5")


def cached_layers(include_top: bool, net: networks.Backbone) -> tuple:
    """The layers every cache holds: each scenario's start layer (from the scenario table)
    plus the feature map (the linear probe's input), in network order.

    VGG16 without the ImageNet top: block4_pool (C), block5_pool (A, B); with it also
    fc2 (A). Another backbone: its stem layer (C) and its feature map (A, B).
    """
    wanted = ({s.start_layer(include_top, net) for s in scenarios.SCENARIOS.values()}
              | {net.feature_layer})
    return tuple(layer for layer in net.cacheable(include_top) if layer in wanted)


def preprocessing(net: networks.Backbone) -> str:
    """The input graph's steps for ``net``, for the provenance (VGG16's is unchanged)."""
    if net.preprocessing == networks.CAFFE:
        return PREPROCESSING
    return f"{PREPROCESSING} -> in the network: {net.describe_input()}"


def image_identity(path: str, view: int = 0) -> str:
    """Changes when the file changes (size or modification time)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}" + (f":{view}" if view else "")


def _keys(items: pd.DataFrame) -> pd.Series:
    return items.path + "|" + items.identity


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


def _items(frame: pd.DataFrame, views: int) -> pd.DataFrame:
    """One row per cached row wanted: each image (and view), with its identity."""
    labels = frame.label if "label" in frame else None
    base = pd.DataFrame({
        "path": [os.path.abspath(p) for p in frame.path],
        "name": frame.name.astype(str).tolist(),
        "label": [int(v) if np.ndim(v) == 0 else -1 for v in labels] if labels is not None
        else -1,
    })
    view_ids = [0] if views == 0 else list(range(1, views + 1))
    items = pd.concat([base.assign(view=v) for v in view_ids], ignore_index=True)
    try:
        items["identity"] = [image_identity(p, v) for p, v in zip(items.path, items.view)]
    except FileNotFoundError as err:
        raise DataError(f"Image {err.filename} disappeared while the run was starting.") from err
    return items


def _usable_rows(path: str, spec: CacheSpec) -> set:
    """Keys of the rows a finished cache file holds; a file that cannot be used as a
    whole is removed (it will be rebuilt) with the reason logged."""
    if not os.path.exists(path):
        return set()
    try:
        with FeatureCache.open(path, spec) as cache:
            return set(cache.index())
    except CacheMismatch as why:
        logging.warning("Cache %s %s: rebuilding it.", path, why)
        os.remove(path)
        return set()


@contextlib.contextmanager
def _writable(path: str, partial: str, spec: CacheSpec, have: set, shapes, chunk: int):
    """The partial file to append to: an interrupted one resumed, else a copy of the
    finished file (when rows are added to it), else a new one."""
    cache = None
    if os.path.exists(partial):
        try:
            cache = FeatureCache.open(partial, spec, mode="r+")
            logging.info("Resuming the interrupted extraction in %s (%d rows done).",
                         partial, cache.rows_done)
        except CacheMismatch as why:
            logging.warning("Partial cache %s %s: starting it again.", partial, why)
            os.remove(partial)
    if cache is None and have:
        try:
            shutil.copyfile(path, partial + ".copy")
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial + ".copy")  # never leave a torn copy behind
            raise
        os.replace(partial + ".copy", partial)
        cache = FeatureCache.open(partial, spec, mode="r+")
    if cache is None:
        cache = FeatureCache.create(partial, spec, shapes, chunk)
    try:
        yield cache
    except BaseException as err:
        keep_open_on_full_disk(err, cache.file)
        if not hasattr(err, "h5_objects"):
            cache.close()
        raise
    cache.file.attrs["complete"] = True
    cache.close()


@dataclasses.dataclass
class CacheResult:
    path: str
    reused: int
    computed: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Extraction:
    """How missing rows are computed: in batches of ``batch_size``, by ``engine`` (None:
    this process; a `features.serve.ray_engine.RayEngine`: Ray workers, whose rows stream back
    here and are written exactly as local ones, with the same resume and checksums),
    with a progress bar unless ``progress`` is False."""
    batch_size: int = 32
    engine: object = None
    progress: bool = True


def ensure_features(classifier: backbone.Classifier, spec: CacheSpec, frame: pd.DataFrame,
                    cache_dir: str, how: Extraction = Extraction(), views: int = 0,
                    recompute: Iterable[str] = ()) -> CacheResult:
    """Makes sure the cache holds features of every image in ``frame``.

    Args:
      classifier: supplies the frozen layers (its weights must match ``spec``).
      spec: what the cache is built from.
      frame: columns ``path, name`` and optionally ``label``.
      cache_dir: folder of cache files (created if needed).
      how: batch size, engine and progress of the extraction.
      views: 0 caches the plain eval-path image; K >= 1 caches K augmented
        views of each image (``spec.augment`` preset) instead.
      recompute: row keys to compute again although present (rows that failed
        their checksum; see `load`).

    Only images whose rows are missing, changed (size/mtime) or in ``recompute``
    are computed; a cache built from anything else is rebuilt, with the reason logged.
    """
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, spec.file_name())
    partial = path[:-3] + ".partial.h5"
    items = _items(frame, views)
    recompute = set(recompute)
    started = time.perf_counter()
    with _lock(path):
        have = _usable_rows(path, spec)
        todo = items[~_keys(items).isin(have - recompute)]
        if todo.empty:
            logging.info("Feature cache hit: %s (%d images).", path, len(items))
            return CacheResult(path, len(items), 0, time.perf_counter() - started)
        shapes = layer_shapes(classifier, spec.layers)
        with _writable(path, partial, spec, have, shapes, how.batch_size) as cache:
            todo = todo[~_keys(todo).isin(set(cache.index()) - recompute)]
            what = (f"{len(todo)} image(s)" if not views else
                    f"{len(todo)} view(s) of {todo.path.nunique()} image(s)")
            logging.info("Extracting %s for %s%s into %s.", ", ".join(spec.layers), what,
                         f" ({len(items) - len(todo)} already cached)"
                         if len(todo) < len(items) else "", path)
            _extract_into(cache, classifier, todo, how)
        os.replace(partial, path)
        progress_lib.clear("extraction")
    return CacheResult(path, len(items) - len(todo), len(todo), time.perf_counter() - started)


def load_features(cache_path: str, spec: CacheSpec, frame: pd.DataFrame,
                  layers: Sequence[str] = None, views: int = 0, stream: bool = False):
    """Features of the images in ``frame`` (in its row order), by layer.

    With ``views`` >= 1 the result has ``len(frame) * views`` rows, view-major.
    With ``stream`` the values are `H5Rows` read on demand. Every row is checked
    against its checksum.

    Raises:
      DataError: the file is unusable, lacks an image of ``frame`` (call
        `ensure_features` first) or has a corrupt row (`CorruptRows`, a DataError
        message; `load` recomputes such rows instead).
    """
    keys = _keys(_items(frame, views)).tolist()
    try:
        cache = FeatureCache.open(cache_path, spec)
    except CacheMismatch as why:
        raise DataError(f"Feature cache {cache_path} {why}; run again to rebuild it.") from None
    with cache:
        try:
            out = cache.read(keys, stream=stream)
        except CorruptRows as err:
            raise DataError(str(err)) from err
    return {layer: out[layer] for layer in (layers or spec.layers)}


def load(classifier: backbone.Classifier, spec: CacheSpec, frame: pd.DataFrame,
         cache_dir: str, how: Extraction = Extraction(), views: int = 0,
         stream: bool = False):
    """`ensure_features` then read them: (features by layer, `CacheResult`).

    Rows that fail their checksum are recomputed once (just those rows) and read again.
    """
    result = ensure_features(classifier, spec, frame, cache_dir, how, views)
    keys = _keys(_items(frame, views)).tolist()
    for attempt in range(2):
        with FeatureCache.open(result.path, spec) as cache:
            try:
                return cache.read(keys, stream=stream), result
            except CorruptRows as err:
                if attempt:
                    raise DataError(str(err)) from err
                bad = err.keys
        logging.warning("Cache %s: %d row(s) fail their checksum; recomputing just those rows.",
                        result.path, len(bad))
        result = ensure_features(classifier, spec, frame, cache_dir, how, views, recompute=bad)
    raise AssertionError("unreachable")


def _local_batches(classifier, spec, todo, batch_size):
    computes_in = classifier.computes_in
    if computes_in != spec.precision:
        # The provenance must say how the rows were really computed.
        raise ConfigError(f"The backbone computes in {computes_in} but the cache is for "
                          f"{spec.precision}; build the classifier after setting the precision.")
    return extract.compute_features(extract.extractor(classifier, spec.layers), todo, spec,
                                    batch_size)


def _extract_into(cache: FeatureCache, classifier, todo, how: Extraction):
    if todo.empty:
        return
    spec = cache.spec
    source = (how.engine.feature_batches(spec, todo, how.batch_size) if how.engine is not None
              else _local_batches(classifier, spec, todo, how.batch_size))
    unit = "view" if (todo.view > 0).any() else "image"  # K views of each image, or images
    bar = (progress_lib.bar(len(todo), unit, "features extracted") if how.progress
           else None)
    per_row = row_bytes(layer_shapes(classifier, spec.layers), spec.dtype)
    total = cache.rows_done + len(todo)
    for chunk, outputs in source:
        done = cache.rows_done
        # Stop while HDF5 can still close the file (see pipeline.diskspace); a chunk
        # of `batch_size` rows per dataset may be allocated at once.
        diskspace.ensure_room(cache.path, 2 * max(len(chunk), how.batch_size) * per_row + (1 << 20),
                              "batch of cached features",
                              f"{done} of {total} rows are committed in {cache.path}")
        feats = {}
        for layer in spec.layers:
            values = outputs[layer].astype(spec.dtype)
            if not np.all(np.isfinite(values)):
                raise ConfigError(
                    f"Features of layer {layer} overflow {spec.dtype} for images such as "
                    f"{chunk.path.iloc[0]}; use --cache_dtype=float32.")
            feats[layer] = values
        cache.append(chunk, feats)
        progress_lib.report("extraction", f"resume the feature extraction: {done + len(chunk)}"
                                          f" of {total} rows are committed in {cache.path}")
        if bar is not None:
            bar.add(len(chunk))


def layer_shapes(classifier: backbone.Classifier, layers: Sequence[str]) -> Dict[str, tuple]:
    """Per-image shape of each named layer's output (one row of the cache)."""
    model = classifier.feature_model(layers)
    return {name: tuple(model.output[name].shape[1:]) for name in layers}


def row_bytes(shapes: Dict[str, tuple], dtype: str) -> int:
    """Bytes one cache row takes on disk: its features plus about 200 bytes of index."""
    item = np.dtype(dtype).itemsize
    return sum(int(np.prod(shape)) * item for shape in shapes.values()) + 200


def feature_bytes(shapes: Dict[str, tuple], rows: int) -> int:
    """Memory that ``rows`` rows of every cached layer take as float32 arrays."""
    return rows * sum(int(np.prod(shape)) * 4 for shape in shapes.values())


def planned_bytes(classifier: backbone.Classifier, spec: CacheSpec, frame: pd.DataFrame,
                  cache_dir: str, views: int = 0) -> int:
    """What `ensure_features` would write for ``frame``: its missing rows, plus a copy
    of the finished file when rows are added to it (the append happens in a copy)."""
    shapes = layer_shapes(classifier, spec.layers)
    path = os.path.join(cache_dir, spec.file_name())
    rows = len(frame) * max(views, 1)
    existing = 0
    if os.path.exists(path):
        try:
            with FeatureCache.open(path, spec) as cache:
                have = set(cache.index())
            rows = int((~_keys(_items(frame, views)).isin(have)).sum())
            existing = os.path.getsize(path) if rows else 0
        except CacheMismatch:
            pass  # it will be rebuilt: count every row
    return rows * row_bytes(shapes, spec.dtype) + existing
