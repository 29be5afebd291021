"""Each deployment format loaded by its own runtime (TensorFlow for the SavedModel,
onnxruntime, the LiteRT interpreter), in a fresh process, to check what
`workflow.use.deploy` wrote: ``python -m workflow.use.runtimes verify FORMAT PATH FOLDER``."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict

import numpy as np

from small_photo_classifier import pipeline
from small_photo_classifier.pipeline.errors import DataError


def last_error(text: str, limit: int = 300) -> str:
    """The final exception of a traceback in ``text``, on one line (at most ``limit``
    characters): what a person reads first, the rest goes to the log file."""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    # The exception's own lines follow the last frame ("  File ...", then its code).
    tail = []
    for line in reversed(lines):
        if line.startswith((" ", "\t")) or line.startswith("Traceback"):
            break
        tail.insert(0, line.strip())
    words = re.sub(r"\s+", " ", " ".join(tail or lines[-1:])).strip()
    return words if len(words) <= limit else words[:limit - 1] + "…"


def run_format(fmt: str, path: str, x: np.ndarray, batch_size: int = 16):
    """Loads ``path`` with the format's own runtime and predicts ``x``; returns
    (outputs, load seconds, seconds per image). ``outputs``: ``{"probabilities": [N,
    units]}``, plus ``"unfamiliar_score": [N]`` for a model that has one (told apart by
    rank, so no runtime's output naming matters)."""
    started = time.perf_counter()
    if fmt == "savedmodel":
        import tensorflow as tf
        loaded_model = tf.saved_model.load(path)  # held: its variables die with it
        predict = lambda b: _listed(loaded_model.serve(tf.constant(b)))  # noqa: E731
    elif fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        predict = lambda b: session.run(None, {name: b})  # noqa: E731
    else:
        predict = _tflite_runner(path)
    loaded = time.perf_counter() - started
    outputs, started = [], time.perf_counter()
    for i in range(0, len(x), batch_size):
        outputs.append(_named(predict(x[i:i + batch_size])))
    per_image = (time.perf_counter() - started) / max(1, len(x))
    joined = {k: np.concatenate([o[k] for o in outputs]) for k in (outputs[0] if outputs else {})}
    return joined, loaded, per_image


def _listed(result) -> list:
    if isinstance(result, dict):
        return [np.asarray(v) for v in result.values()]
    return [np.asarray(result)]


def _named(arrays) -> Dict[str, np.ndarray]:
    """A runtime's outputs by meaning: the rank-1 output is the unfamiliar score."""
    out = {}
    for a in (arrays if isinstance(arrays, (list, tuple)) else [arrays]):
        a = np.asarray(a, np.float64)
        out["unfamiliar_score" if a.ndim == 1 else "probabilities"] = a
    return out


def _tflite_runner(path: str):
    try:  # LiteRT, TFLite's successor; tf.lite.Interpreter is deprecated
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path)
    inp, outs = interpreter.get_input_details()[0], interpreter.get_output_details()
    shape = {"n": None}

    def predict(batch):
        if shape["n"] != len(batch):
            interpreter.resize_tensor_input(inp["index"], batch.shape)
            interpreter.allocate_tensors()
            shape["n"] = len(batch)
        interpreter.set_tensor(inp["index"], batch.astype(np.float32))
        interpreter.invoke()
        return [interpreter.get_tensor(o["index"]) for o in outs]
    return predict


def verify_in_fresh_process(fmt: str, path: str, x: np.ndarray) -> Dict[str, object]:
    """`run_format` in a new Python process (nothing of this one's TensorFlow state
    helps it load): outputs, load seconds, seconds per image."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "x.npy"), x)
        cmd = [sys.executable, "-m", "small_photo_classifier.workflow.use.runtimes", "verify", fmt,
               os.path.abspath(path), tmp]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=pipeline.PACKAGE_PARENT,
                              env=env)
        if done.returncode:
            from small_photo_classifier.workflow.base.console import DETAIL
            DETAIL.info("%s refused by its runtime (%s):\n%s", path, fmt, done.stderr)
            raise DataError(f"{path} was written but does not load with its runtime "
                            f"({fmt}): {last_error(done.stderr)}")
        with open(os.path.join(tmp, "timing.json"), encoding="utf-8") as f:
            timing = json.load(f)
        with np.load(os.path.join(tmp, "y.npz")) as outputs:
            return {"outputs": dict(outputs), **timing}




def _verify_main(argv) -> None:
    fmt, path, folder = argv
    x = np.load(os.path.join(folder, "x.npy"))
    outputs, loaded, per_image = run_format(fmt, path, x)
    np.savez(os.path.join(folder, "y.npz"), **outputs)
    with open(os.path.join(folder, "timing.json"), "w", encoding="utf-8") as f:
        json.dump({"load_seconds": loaded, "seconds_per_image": per_image}, f)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "verify":
        _verify_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m workflow.use.runtimes verify FORMAT PATH FOLDER")
