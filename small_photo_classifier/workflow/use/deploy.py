"""Models for deployment: SavedModel (TF Serving), ONNX (onnxruntime) and TFLite (phones,
small devices), each checked against ``model.keras`` after it is written.

Every format is made from ``model.keras`` rebuilt in float32 (a model trained
under a mixed policy would carry bfloat16 kernels that TFLite cannot run):

* ``savedmodel/`` — Keras 3's ``keras.export.ExportArchive`` with one ``serve``
  endpoint (also the ``serving_default`` signature) taking the input below. The
  archive is not asked to ``track`` the model: its variables are collected from
  the endpoint alone, so each is written once (``model.export`` tracks the Keras
  variables *and* the endpoint's TensorFlow ones and writes every weight twice,
  keras-team/keras#23553);
* ``model.onnx`` — Keras 3's ``model.export(format="onnx")`` (tf2onnx underneath);
* ``model.tflite`` — the TFLite converter on that SavedModel; ``--quantize=fp16``
  stores float16 weights, ``int8`` quantizes weights and activations with a
  representative dataset drawn from the validation images (``model_int8.tflite``).

Verification: each file is loaded by its own runtime in a fresh process
(``python -m workflow.use.runtimes verify``: TensorFlow, onnxruntime, the LiteRT
interpreter) and predicts the validation images; the largest probability
difference from ``model.keras``, the change in the task's headline score, the load
time and the CPU latency per image are recorded (``metrics.json["exports"]``).

Input of every format: float32 ``[N, S, S, 3]``, the photo resized to S px with
its channels in BGR order minus the ImageNet means (`pipeline.ops.vgg_mean_centre`);
output: the model's probabilities, in ``model_info.json``'s class order.
"""

import os
import shutil
import tempfile
import time
import warnings
from typing import Dict, Sequence

import numpy as np

from small_photo_classifier.pipeline import run_info
from small_photo_classifier.pipeline.errors import ConfigError, DataError

SAVEDMODEL_DIR = "savedmodel"
REPRESENTATIVE_IMAGES = 100


def file_name(fmt: str, quantize: str = "none") -> str:
    """Where a format goes in the run folder."""
    if fmt == "savedmodel":
        return SAVEDMODEL_DIR
    if fmt == "onnx":
        return "model.onnx"
    return "model.tflite" if quantize in ("none", None) else f"model_{quantize}.tflite"


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
                   for f in files)
    return os.path.getsize(path)


def _replace(tmp: str, path: str) -> None:
    """Moves a finished file or folder into place (the old one only goes once the new one
    is whole)."""
    if os.path.isdir(path) and not os.path.islink(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def convert(model, fmt: str, workdir: str, quantize: str = "none", representative=None) -> str:
    """Writes ``model`` (float32) in ``fmt`` into ``workdir``; returns the path."""
    import tensorflow as tf
    path = os.path.join(workdir, file_name(fmt, quantize))
    tmp = path + ".tmp"
    if os.path.isdir(tmp):  # a torn SavedModel folder from an interrupted export
        shutil.rmtree(tmp, ignore_errors=True)
    if fmt == "savedmodel":
        _saved_model(model, tmp)
    elif fmt == "onnx":
        # tf2onnx logs tracebacks when one of its graph optimisers does not apply (e.g.
        # its transpose pass on MobileNetV3's hard-swish constants) or a shape cannot be
        # inferred, and goes on; the file is then checked against predict.py like every
        # other, so its logs go to the log file only.
        from small_photo_classifier.workflow.base.console import logs_to_file_only
        with warnings.catch_warnings(), logs_to_file_only("tf2onnx"):
            # Keras' tf2onnx shim probes np.object on import; NumPy 2 answers with a
            # FutureWarning that says nothing to our users.
            warnings.filterwarnings("ignore", message="In the future `np.object`",
                                    category=FutureWarning)
            onnx_ready(model).export(tmp, format="onnx", verbose=False)
    else:
        with tempfile.TemporaryDirectory() as saved:
            _saved_model(model, os.path.join(saved, "sm"))
            converter = tf.lite.TFLiteConverter.from_saved_model(os.path.join(saved, "sm"))
            if quantize == "fp16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            elif quantize == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = lambda: ([x[None]] for x in representative)
            from small_photo_classifier.workflow.base.console import native_stderr_hidden
            with native_stderr_hidden():  # the converter's C++ summary lines
                flatbuffer = converter.convert()
            with open(tmp, "wb") as f:
                f.write(flatbuffer)
    _replace(tmp, path)
    return path


def onnx_ready(model):
    """``model`` with the layers tf2onnx converts wrongly replaced by the same maths in
    layers it converts (every other layer shared, weights and all):

    * Normalization -> Rescaling: a Normalization layer holds its mean and variance as
      eager tensors, which tf2onnx leaves as graph inputs instead of constants, and
      onnxruntime refuses the file ("Required inputs ... are missing"). Keras'
      EfficientNetV2 has one at its input; the linear probe's standardisation is one.
    * a grouped Conv2D with one group per channel -> DepthwiseConv2D (the same kernel,
      reshaped): TensorFlow runs grouped convolutions as a nested function that
      tf2onnx leaves as an unknown ``StatefulPartitionedCall`` (ConvNeXt).
    * exact GELU -> the same formula through ``erf``: TensorFlow computes it with
      ``erfc``, which ONNX lacks (ConvNeXt).
    The export is checked against model.keras afterwards (max |dP| in metrics.json).
    """
    import keras
    if not any(_onnx_swap(l) is not l for l in _all_layers(model)):
        model(np.zeros((1, *model.input.shape[1:]), np.float32))  # export wants a called model
        return model
    clone = keras.models.clone_model(model, clone_function=_onnx_swap, recursive=True)
    clone(np.zeros((1, *model.input.shape[1:]), np.float32))  # export wants a called model
    return clone


def _onnx_swap(layer):
    import keras
    if isinstance(layer, keras.layers.Conv2D) and layer.groups > 1 \
            and layer.groups == layer.filters and layer.built:
        kernel = np.asarray(layer.kernel)  # (k, k, 1, C) -> depthwise (k, k, C, 1)
        depthwise = keras.layers.DepthwiseConv2D(
            layer.kernel_size, strides=layer.strides, padding=layer.padding,
            use_bias=layer.use_bias, activation=layer.activation, name=layer.name,
            dilation_rate=layer.dilation_rate, dtype=layer.dtype_policy)
        depthwise.build((None, None, None, kernel.shape[-1]))
        depthwise.set_weights([np.transpose(kernel, (0, 1, 3, 2))]
                              + ([np.asarray(layer.bias)] if layer.use_bias else []))
        return depthwise
    if isinstance(layer, keras.layers.Activation) and \
            getattr(layer.activation, "__name__", "") == "gelu":
        return ErfGelu(name=layer.name, dtype=layer.dtype_policy)
    if isinstance(layer, keras.layers.Normalization) and not layer.invert:
        mean = np.asarray(layer.mean, np.float64).reshape(-1)
        std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)).reshape(-1),
                         keras.backend.epsilon())
        return keras.layers.Rescaling(scale=(1.0 / std).astype(np.float32).tolist(),
                                      offset=(-mean / std).astype(np.float32).tolist(),
                                      name=layer.name, dtype=layer.dtype_policy)
    return layer


def _erf_gelu_class():
    import keras
    import tensorflow as tf

    class ErfGelu(keras.layers.Layer):
        """Exact GELU, ``0.5 x (1 + erf(x / sqrt 2))``: an ONNX ``Erf``. Export only."""

        def call(self, x):
            return 0.5 * x * (1.0 + tf.math.erf(x * 0.7071067811865476))
    return ErfGelu


def ErfGelu(name, dtype=None):  # noqa: N802 (a factory: keras imported only on export)
    """An `_erf_gelu_class` layer named ``name``."""
    return _erf_gelu_class()(name=name, dtype=dtype)


def _all_layers(model):
    out = []
    for layer in getattr(model, "layers", []):
        out += [layer] + _all_layers(layer)
    return out


def _saved_model(model, path: str) -> None:
    """The model as a SavedModel with a ``serve`` endpoint, every variable stored once."""
    import keras
    import tensorflow as tf
    archive = keras.export.ExportArchive()
    archive.add_endpoint(
        "serve", tf.autograph.experimental.do_not_convert(
            lambda image: model(image, training=False)),
        input_signature=[tf.TensorSpec([None, *model.input.shape[1:]], tf.float32,
                                       name="image")])
    archive.write_out(path, verbose=False)


def export_all(model, formats: Sequence[str], quantize: str, workdir: str, val, task,
               held_out: bool = True, trusted=(None, None)) -> Dict[str, dict]:
    """Writes every format, verifies each in a fresh process against what predict.py
    computes with ``model`` on the validation inputs ``x_val`` (labels ``y_val``); returns
    what metrics.json records. ``val``: (inputs, labels).

    With ``trusted`` = (model_info.json's dict, the reference features) carrying a
    calibration and reference features (`workflow.train.trusting`, applied by `workflow.use.trusted`) each
    format carries them in its graph and has two outputs, the calibrated probabilities
    and the unfamiliar score, both checked. ``held_out`` False (a model refitted on every
    label, validation images included): only the formats' agreement with ``model`` is
    recorded (max |dP|, score change), never a score that would read as held-out."""
    (x_val, y_val), (info, reference) = val, trusted
    info = info or {}
    from small_photo_classifier.features import precision
    from small_photo_classifier.workflow.use import trusted
    # Every format is a float32 graph whatever the run trained in: a layer built
    # under a mixed global policy (the ONNX rewrites, the wrappers below) would put
    # bfloat16 kernels into the file, which onnxruntime and TFLite refuse.
    with precision.global_policy("float32"):
        model = precision.float32_copy(model)
        expected = trusted.expected_outputs(model, info, task, x_val, reference)
        exported = _with_trust(model, info, reference)
        return _export_each(exported, (formats, quantize), workdir, (x_val, y_val), task,
                            held_out, expected)


def _with_trust(model, info: dict, reference):
    """The graph each format is made from: ``model`` with the run's calibration and
    unfamiliar score inside it where it has them."""
    from small_photo_classifier.features import trust_layers
    if reference is not None:
        return trust_layers.trusted_model(model, info, reference)
    if info.get("calibration"):
        return trust_layers.calibrated_model(model, info)
    return model


def _export_each(exported, jobs_asked, workdir: str, val, task, held_out: bool,
                 expected: dict) -> Dict[str, dict]:
    """Converts and checks each format in turn; a format that fails gets ``{"error": one
    line}`` (the details in the log file) and the others go on."""
    formats, quantize = jobs_asked
    jobs = [(f, "none") for f in formats]
    if "tflite" in formats and quantize not in ("none", None):
        jobs.append(("tflite", quantize))
    rng = np.random.default_rng(0)
    representative = val[0][rng.permutation(len(val[0]))[:REPRESENTATIVE_IMAGES]]
    out = {}
    for number, (fmt, q) in enumerate(jobs, 1):
        key = fmt if q == "none" else f"{fmt}_{q}"
        # A conversion takes from seconds to minutes (ONNX of VGG16: 85 s) and prints
        # nothing of its own: say what is running, and what is next.
        print(f"export {number}/{len(jobs)}: {key}: converting to {file_name(fmt, q)}, then "
              f"checking it in a fresh process on {len(val[1])} validation images "
              f"(started {time.strftime('%H:%M:%S')})", flush=True)
        try:
            out[key] = _export_one(exported, (fmt, q), workdir, representative,
                                   (val, task, held_out, expected))
        except Exception as err:  # noqa: BLE001 (a converter's failure is any exception)
            out[key] = {"error": _failed(err, os.path.join(workdir, file_name(fmt, q))),
                        "quantize": q}
    return out


def _export_one(exported, job, workdir: str, representative, check) -> dict:
    """One format written and checked against ``expected`` on the validation images."""
    (fmt, q), ((x_val, y_val), task, held_out, expected) = job, check
    from small_photo_classifier.workflow.use import runtimes
    started = time.perf_counter()
    path = convert(exported, fmt, workdir, q, representative)
    seconds = time.perf_counter() - started
    checked = runtimes.verify_in_fresh_process(fmt, path, x_val)
    outputs = checked.pop("outputs")
    probs = task.probabilities(outputs["probabilities"])
    score = task.scores(y_val, probs)[task.headline]
    ref_score = task.scores(y_val, expected["probabilities"])[task.headline]
    out = {"file": os.path.basename(path), "bytes": _size(path),
           "convert_seconds": round(seconds, 2),
           "load_seconds": round(checked["load_seconds"], 3),
           "ms_per_image": round(1000 * checked["seconds_per_image"], 2),
           "max_abs_dp": float(np.max(np.abs(probs - expected["probabilities"])))
           if len(x_val) else 0.0, f"{task.headline}_change": score - ref_score,
           "images": int(len(x_val)), "quantize": q, "outputs": sorted(outputs),
           **({f"{task.headline}_keras": ref_score, f"{task.headline}": score}
              if held_out else {})}
    if "unfamiliar_score" in expected:
        got = outputs.get("unfamiliar_score")
        out["max_abs_d_unfamiliar"] = (
            float(np.max(np.abs(got - expected["unfamiliar_score"]))) if got is not None
            and len(x_val) else (0.0 if got is not None else float("nan")))
    return out


def _failed(err: BaseException, path: str) -> str:
    """One line for a format that could not be made or loaded; the traceback goes to the
    log file and a file that its runtime refuses is removed (nobody should ship it)."""
    import traceback
    from small_photo_classifier.workflow.base.console import DETAIL
    from small_photo_classifier.workflow.use.runtimes import last_error
    DETAIL.info("export %s failed:\n%s", path, "".join(traceback.format_exception(err)))
    for leftover in (path, path + ".tmp"):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        elif os.path.exists(leftover):
            os.remove(leftover)
    if isinstance(err, DataError):
        return str(err)
    # A converter's message may hold a whole traceback (tf2onnx's do): its last line.
    return last_error(f"{type(err).__name__}: {err}")


def validation_set(workdir: str, task, image_size: int, batch_size: int = 32):
    """The run's validation images (``split.csv``) as model inputs and labels."""
    import pandas as pd
    from small_photo_classifier.pipeline import input as input_lib
    split_csv = os.path.join(workdir, "split.csv")
    if not os.path.isfile(split_csv):
        raise ConfigError(f"{workdir} has no split.csv: the exports are checked on the run's "
                          "validation images, so export from a train.py run folder.")
    val = pd.read_csv(split_csv, dtype={"name": str, "label": str}, keep_default_na=False)
    val = val[val.subset == "val"]
    missing = [p for p in val.path if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} validation image(s) of {split_csv} are gone, e.g. "
                        f"{missing[0]}: the exports are checked on them.")
    index = {n: i for i, n in enumerate(task.class_names)}
    if task.kind in ("binary", "multiclass"):
        # Class names; a binary run folder from before they were written there has 0/1.
        y = np.array([index[v] if v in index else int(v) for v in val.label], int)
    else:
        y = np.array([[int(n in row.split()) for n in task.class_names] for row in val.label])
    batches = input_lib.eval_dataset(val.path.tolist(), None, val.name.tolist(), image_size,
                                     batch_size)
    x = np.concatenate([b["image"].numpy() for b in batches]) if len(val) else \
        np.zeros((0, image_size, image_size, 3), np.float32)
    return x.astype(np.float32), y


def deploy_run(workdir: str, formats: Sequence[str], quantize: str = "none",
               batch_size: int = 32) -> Dict[str, dict]:
    """Exports ``workdir``'s model.keras in ``formats``, checks each, records the checks in
    metrics.json (``exports``); returns them."""
    from small_photo_classifier.features.serve import inference
    from small_photo_classifier.workflow.base import process_state
    from small_photo_classifier.workflow.base.outputs import RunFolder
    from small_photo_classifier.workflow.use import loaded, trusted
    # The run's loader, as predict.py's, in float32 (the exports' precision) with the
    # calling process's dtype policy put back: train.py --export calls this too.
    saved = process_state.snapshot()
    try:
        run = loaded.load(workdir, bag=False, tta=1, precision="float32", unfamiliar=False)
    finally:
        process_state.restore(saved)
    model, info = run.model, run.info
    task = inference.task_of(info)
    x_val, y_val = validation_set(workdir, task, int(info["image_size"]), batch_size)
    held_out = not info.get("refit")
    results = export_all(model, formats, quantize, workdir, (x_val, y_val), task, held_out,
                         (info, trusted.load_reference(workdir, info)))
    run = RunFolder(workdir)
    images = (f"the run's {len(y_val)} validation images (split.csv), held out from "
              "model.keras" if held_out else
              f"the run's {len(y_val)} validation images (split.csv), which the refitted "
              "model.keras was trained on: agreement with model.keras only, no score")
    run.update_metrics("exports", {**results, "input": INPUT, "checked_on": images})
    _rewrite_report(workdir)
    print(f"Exports checked against predict.py (model.keras, one view) on {images}:")
    for key, r in results.items():
        if "error" in r:
            print(f"export {key}: failed, no file kept: {r['error']} (details in the log "
                  "file)")
            continue
        _print_check(key, r, workdir, task.headline, held_out)
    failed = [k for k, r in results.items() if "error" in r]
    if failed:
        raise DataError(f"export {', '.join(failed)} failed (above; the details are in the "
                        f"log file); model.keras and the other formats in {workdir} are "
                        "complete and checked.")
    return results


def _rewrite_report(workdir: str) -> None:
    """report.html again, now with its exports section (the training's commands kept)."""
    from small_photo_classifier.workflow.base import console
    from small_photo_classifier.workflow.views import report
    if os.path.isfile(os.path.join(workdir, "metrics.json")):
        path = report.write_run_report(workdir, {"Export again": console.command_line("export.py")})
        print(f"{path}: its exports section now shows these checks")


def _print_check(key: str, r: dict, workdir: str, headline: str, held_out: bool) -> None:
    score = (f"{headline} {r[headline]:.4f} ({r[headline + '_change']:+.4f} vs model.keras)"
             if held_out else
             f"{headline} change vs model.keras {r[headline + '_change']:+.4f}")
    unfamiliar = (f", max |d unfamiliar_score| {r['max_abs_d_unfamiliar']:.2g}"
                  if "max_abs_d_unfamiliar" in r else "")
    print(f"export {key}: {os.path.join(workdir, r['file'])} ({r['bytes'] / 1e6:.1f} MB), "
          f"max |dP| vs predict.py {r['max_abs_dp']:.2g}{unfamiliar}, {score}, "
          f"{r['ms_per_image']:.1f} ms/image on CPU")
    if r["max_abs_dp"] > 1e-4 or r.get("max_abs_d_unfamiliar", 0.0) > 1e-3:
        print(f"warning: export {key} differs from predict.py by more than 1e-4 in a "
              "probability or 1e-3 in an unfamiliar score (above): check it before "
              "shipping it" + (" (quantized: expected)" if r["quantize"] != "none" else ""))


INPUT = ("float32 [N, S, S, 3]: the photo resized to S px, " + run_info.INPUT_VALUES
         + "; outputs: probabilities (after model_info.json's calibration, [N, units]) in "
         "model_info.json's class order, and unfamiliar_score ([N]) when the run has one")
