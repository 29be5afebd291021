"""Rows of cached features, and the batches training and validation read from them.

Cached features are either NumPy arrays or `H5Rows`, an array-like that reads
rows from the HDF5 cache on demand (for feature sets larger than memory). Every
consumer (heads, cross-validation, the probe, fine-tuning from cached views)
reads them through the helpers here, so both kinds behave the same.
"""

import weakref
from typing import Optional

import h5py
import numpy as np
import tensorflow as tf


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


def take(x, rows):
    """Rows of ``x``: for an array, a view when ``rows`` are consecutive (a split's
    training rows come first: no second copy of a Kaggle-sized feature set), else a
    copy; for `H5Rows`, a view that reads nothing."""
    if not isinstance(x, np.ndarray):
        return x.take(rows)
    rows = np.asarray(rows)
    if rows.ndim == 1 and len(rows) and rows.dtype.kind in "iu" and rows[0] >= 0 and \
            rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        view = x[rows[0]:rows[-1] + 1]
        view.flags.writeable = False  # shared with the rows it came from: read only
        return view
    return x[rows]


def concat(parts):
    """Rows of ``parts`` one after the other, streamed if any part is streamed."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    if all(isinstance(p, H5Rows) for p in parts):
        return H5Rows.concat(parts)
    raise TypeError("Cannot mix in-memory and streamed features in one training set; load "
                    "both the same way.")


def with_views(x, y, views_x=None, rows=None):
    """Training rows ``rows`` of the plain features plus the same images' cached views.

    ``views_x`` holds V views per image, view-major (row ``v * N + i`` is view v of
    image i of the N plain rows), as the cache returns them. Streamed features stay
    streamed. Labels ``y`` may be [N] or [N, K].
    """
    y = np.asarray(y)
    n = len(y)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    if views_x is None or len(views_x) == 0:
        return take(x, rows), y[rows]
    v = len(views_x) // n
    view_rows = np.concatenate([rows + k * n for k in range(v)])
    return concat([take(x, rows), take(views_x, view_rows)]), np.concatenate([y[rows]] * (v + 1))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch`` (0-based): ``default_rng([seed, epoch]).permutation(n)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_bounds(n: int, batch_size: int, min_rows: int = 1) -> np.ndarray:
    """Start offsets of the batches of ``n`` rows, plus ``n`` at the end.

    A last batch with fewer than ``min_rows`` rows joins the one before: under a
    strategy of R replicas (``min_rows=R``) no replica may get an empty batch.
    """
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_rows:
        starts.pop()
    return np.asarray(starts + [n], np.int64)


class _Source:
    """What a batch is gathered from: the rows, targets and weights of one fit."""

    def __init__(self, x, y, weights):
        self.x, self.y, self.weights = x, y, weights


def _loader(source: _Source, rows_of):
    """A tf.data map from a batch index to (features, targets[, weights]), gathered on
    the host from ``source``, which it holds only weakly.

    TensorFlow keeps a ``numpy_function``'s Python function registered for as long as
    the graph that uses it lives, and a dataset map's graph outlives the fit: a closure
    over the arrays kept every cross-validation fold's training rows in memory for the
    rest of the run (46 MB a fold for Lite0's 7 x 7 x 1280 maps of 156 photos). The
    fit holds the source (see `shuffled_batches`); afterwards the rows can be freed."""
    shape, target_shape = tuple(np.shape(source.x)[1:]), tuple(source.y.shape[1:])
    has_weights = source.weights is not None
    ref = weakref.ref(source)

    def gather(i):
        data = ref()
        rows = rows_of(int(i))
        out = (np.asarray(data.x[rows], np.float32), data.y[rows])
        return out if data.weights is None else (*out, data.weights[rows])

    def load(i):
        types = [tf.float32] * (3 if has_weights else 2)
        out = tf.numpy_function(gather, [i], types, stateful=False)
        out[0].set_shape([None, *shape])
        out[1].set_shape([None, *target_shape])
        if has_weights:
            out[2].set_shape([None])
        return tuple(out)
    return load


class Batches:
    """A dataset of batches and what it reads from: keep this object (not only the
    dataset) for as long as the dataset is iterated."""

    def __init__(self, dataset, source: Optional[_Source] = None):
        self.dataset, self.source = dataset, source


def shuffled_batches(x, y, batch_size: int, seed: int, epochs: range,
                     per_epoch: Optional[int] = None, min_rows: int = 1, weights=None):
    """The feature batches of ``epochs`` (0-based epoch numbers, e.g. ``range(3, 10)``),
    each epoch in its `epoch_order`; returns (dataset, steps per epoch). Fit it with
    ``steps_per_epoch=steps`` (and ``initial_epoch=epochs.start``): epoch e's batches
    depend on e alone, so a fit continued from epoch 3 sees what one fit of every epoch
    would have seen.

    ``per_epoch`` rows (default: all) are taken from the front of each epoch's order,
    e.g. one image's worth of a pool of K augmented views per image. ``y`` holds the
    training targets ([N] or [N, K]); ``min_rows`` see `batch_bounds`; ``weights``
    (one per row) makes the batches (features, targets, sample weights).

    The order is a table fixed before training, so two identical runs in one process
    train identically (Keras' ``shuffle=True`` draws from TensorFlow's global op-seed
    counter) and so does a MirroredStrategy run: under it, a seeded tf.data shuffle
    and a PyDataset both came out in another order from the second epoch on, because
    the strategy resets and prefetches input differently. Rows are gathered from
    ``x`` (anything NumPy-indexable) on the host, a batch at a time.
    """
    n = len(y)
    per_epoch = n if per_epoch is None else min(per_epoch, n)
    bounds = batch_bounds(per_epoch, batch_size, min_rows)
    steps = len(bounds) - 1
    count = len(epochs)
    orders = np.stack([epoch_order(n, seed, e)[:per_epoch]
                       for e in epochs]) if count else None

    def rows_of(i):
        epoch, step = divmod(i, steps)
        return orders[epoch, bounds[step]:bounds[step + 1]]

    source = _Source(x, np.asarray(y, np.float32),
                     None if weights is None else np.asarray(weights, np.float32))
    dataset = (tf.data.Dataset.range(count * steps).map(_loader(source, rows_of))
               .prefetch(2))
    return Batches(dataset, source), steps
