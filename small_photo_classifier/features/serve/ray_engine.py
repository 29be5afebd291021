"""Feature extraction and batch prediction on a Ray cluster (Ray Data).

Both are embarrassingly parallel batch inference, which is what Ray Data's
``map_batches`` with actor workers is for: each actor builds the backbone (or
loads the exported model) once, then maps batches of image paths to features
or probabilities. The driver streams the results back and stays the only
writer: features go into the HDF5 cache through `features.store.cache` (same
provenance, checksums, resume and locking as a local run), probabilities into
the CSV in input order. A worker that dies loses no committed row, and a
rerun computes only what is missing.

Requirements on a real cluster: this project and its dependencies installed on
every node (``pip install -e ".[ray]"``), and the images, the weights file (or
``~/.keras/models`` for ImageNet) and, for prediction, the run folder readable at
the same paths on every node (a shared file system). Ray is imported only when
``--ray_address`` is given.
"""

import dataclasses
import logging
import os
from typing import Iterator, Optional, Tuple

import numpy as np
import pandas as pd

from small_photo_classifier import pipeline
from small_photo_classifier.pipeline.errors import ConfigError

# What travels to a worker per image; "row" puts results back in order.
_ITEM_COLUMNS = ("row", "path", "name", "label", "view", "identity")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ConfigError("--ray_address needs Ray Data: pip install -e \".[ray]\" (installs "
                          "ray[data]).") from err
    return ray


@dataclasses.dataclass
class RayEngine:
    """A Ray cluster to compute on.

    Attributes:
      address: "local" (start a throw-away cluster on this machine with
        ``workers`` CPUs, on loopback), "auto" (the cluster this machine belongs
        to, e.g. after ``ray start``), or "HOST:PORT" of a cluster's head.
      workers: actor workers (each holds one copy of the model).
      build: keyword arguments of `features.backbone.build_classifier` for the
        workers (weights, include_top, image_size, seed).
      precision: the Keras policy the workers compute in.
    """
    address: str
    workers: int = 2
    build: Optional[dict] = None
    precision: str = "float32"
    _started: bool = False

    def start(self) -> "RayEngine":
        """Connects to (or, for "local", starts) the cluster."""
        ray = _import_ray()
        if self.workers < 1:
            raise ConfigError(f"--ray_workers must be at least 1; got {self.workers}.")
        if ray.is_initialized():
            return self
        # The package may run from a checkout that is not installed, so the workers are
        # told where it is: on this machine, the folder holding it on PYTHONPATH; on a
        # cluster, Ray ships the package to every node (py_modules).
        root = pipeline.PACKAGE_PARENT
        try:
            if self.address == "local":
                env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": root,
                                    "CUDA_VISIBLE_DEVICES":
                                        os.environ.get("CUDA_VISIBLE_DEVICES", "")}}
                ray.init(num_cpus=self.workers, include_dashboard=False,
                         runtime_env=env, log_to_driver=False, configure_logging=False)
            else:
                env = {"py_modules": [pipeline.PACKAGE]}
                ray.init(address=self.address, runtime_env=env, log_to_driver=False,
                         configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"Cannot reach the Ray cluster at --ray_address={self.address} "
                              f"({err}). Start one with `ray start --head`, pass its "
                              "HOST:PORT, or use --ray_address=local.") from err
        ray.data.DataContext.get_current().enable_progress_bars = False
        self._started = True
        logging.info("Ray: %s cluster, %d worker(s), resources %s.", self.address,
                     self.workers, ray.cluster_resources())
        return self

    def stop(self) -> None:
        """Shuts down a cluster this engine started (a connection otherwise)."""
        if self._started:
            _import_ray().shutdown()
            self._started = False

    def _gpus_per_worker(self) -> float:
        ray = _import_ray()
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= self.workers else 0.0

    def _map(self, items: pd.DataFrame, worker, kwargs: dict, batch_size: int):
        ray = _import_ray()
        items = items.reset_index(drop=True)
        # One block per batch, so that every worker gets work from the start.
        blocks = [items.iloc[i:i + batch_size] for i in range(0, len(items), batch_size)]
        return ray.data.from_pandas(blocks).map_batches(
            worker, fn_constructor_kwargs=kwargs, batch_size=batch_size,
            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=1, num_gpus=self._gpus_per_worker())

    def feature_batches(self, spec, todo: pd.DataFrame,
                        batch_size: int) -> Iterator[Tuple[pd.DataFrame, dict]]:
        """Like a local extraction: yields ``(rows of todo, {layer: features})`` as they
        arrive (in any order; each row says which image it is)."""
        if self.build is None:
            raise ConfigError("The Ray engine needs the backbone's build arguments.")
        items = todo.assign(row=np.arange(len(todo)))[list(_ITEM_COLUMNS)]
        kwargs = {"build": self.build, "spec": spec, "batch_size": batch_size}
        for batch in self._map(items, FeatureWorker, kwargs, batch_size).iter_batches(
                batch_size=None, batch_format="numpy"):
            rows = np.asarray(batch["row"], np.int64)
            yield todo.iloc[rows], {l: np.asarray(batch[l]) for l in spec.layers}

    def predict(self, workdir: str, bag: bool, frame: pd.DataFrame, image_size: int,
                batch_size: int, tta: int) -> np.ndarray:
        """Model outputs [N, units] of every row of ``frame`` (columns path, name), in order."""
        items = pd.DataFrame({"row": np.arange(len(frame)), "path": frame.path.tolist(),
                              "name": frame.name.astype(str).tolist()})
        kwargs = {"workdir": os.path.abspath(workdir), "bag": bag, "policy": self.precision,
                  "image_size": image_size, "batch_size": batch_size, "tta": tta}
        outputs = None
        for batch in self._map(items, PredictWorker, kwargs, batch_size).iter_batches(
                batch_size=None, batch_format="numpy"):
            values = np.asarray(batch["outputs"], np.float64)
            if outputs is None:
                outputs = np.full((len(frame), values.shape[1]), np.nan)
            outputs[np.asarray(batch["row"], np.int64)] = values
        if outputs is None or np.isnan(outputs).any():
            missing = len(frame) if outputs is None else int(np.isnan(outputs[:, 0]).sum())
            raise ConfigError(f"Ray returned no prediction for {missing} image(s).")
        return outputs


@dataclasses.dataclass
class RemoteModel:
    """A run's exported model (``bag.keras`` with ``bag``, else ``model.keras``) as Ray
    workers load and run it: `features.serve.inference.predict_frame` takes it in place of a
    local model."""
    engine: RayEngine
    workdir: str
    bag: bool = False

    def predict(self, frame: pd.DataFrame, image_size: int, batch_size: int,
                tta: int) -> np.ndarray:
        """Model outputs [N, units] of every row of ``frame``, in order."""
        return self.engine.predict(self.workdir, self.bag, frame, image_size, batch_size, tta)


class FeatureWorker:
    """A Ray actor: builds the backbone once, then computes feature batches."""

    def __init__(self, build: dict, spec, batch_size: int):
        from small_photo_classifier.features import backbone, precision
        from small_photo_classifier.features.store import extract
        precision.apply(precision.Precision(spec.precision, "Ray worker"))
        classifier = backbone.build_classifier(**build)
        model = classifier.feature_model(spec.layers)
        import tensorflow as tf
        self._predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self._spec, self._batch_size, self._extract = spec, batch_size, extract

    def __call__(self, items: pd.DataFrame) -> dict:
        out = {"row": [], **{l: [] for l in self._spec.layers}}
        for chunk, feats in self._extract.compute_features(self._predict, items, self._spec,
                                                           self._batch_size):
            out["row"].append(chunk.row.to_numpy())
            for layer in self._spec.layers:
                # float32 on the wire whatever the compute type (NumPy lacks bfloat16).
                out[layer].append(feats[layer].astype(np.float32))
        return {k: np.concatenate(v) for k, v in out.items()}


class PredictWorker:
    """A Ray actor: loads the exported model once (safe mode), then predicts batches."""

    def __init__(self, workdir: str, bag: bool, policy: str, image_size: int,
                 batch_size: int, tta: int):
        from small_photo_classifier.features.serve import inference
        from small_photo_classifier.features import precision
        precision.apply(precision.Precision(policy, "Ray worker"))
        # The loader predict.py's `workflow.use.loaded.load` calls, without the unfamiliar
        # score's features (the driver scores what the workers return).
        self._model, _, _ = inference.load_predictor(workdir, bag, policy, False)
        self._args = (image_size, batch_size, tta)
        self._inference = inference

    def __call__(self, items: pd.DataFrame) -> dict:
        image_size, batch_size, tta = self._args
        outputs = self._inference.predict_paths(self._model, items.path.tolist(),
                                                items.name.tolist(), image_size, batch_size,
                                                tta, progress=False)
        return {"row": items.row.to_numpy(), "outputs": outputs}
