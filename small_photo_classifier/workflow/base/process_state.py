"""The process-global state a run changes, saved and put back: what lets the Python API
(`small_photo_classifier.train`, `load`) run inside a user's notebook without changing
the user's own Keras work in the same kernel.

A run sets Keras' dtype policy (``--precision``), seeds every random generator
(``--seed``), and adds logging handlers and a transcript of the console; each is put
back when the call returns, whatever it raised."""

import contextlib
import logging
import random
import sys

import numpy as np

# The loggers whose levels a run sets (`console.setup_logging`).
_LOGGERS = ("", "tensorflow", "absl", "detail")


def snapshot() -> dict:
    """Keras' dtype policy and config, the random generators' states and seeds (Python,
    NumPy, TensorFlow, Keras), the logging handlers and levels, sys.stdout/stderr."""
    import keras
    from keras.src.backend.common import global_state as keras_state
    from tensorflow.python.eager import context
    loggers = {name: logging.getLogger(name) for name in _LOGGERS}
    return {
        "dtype_policy": keras.mixed_precision.global_policy().name,
        "keras_config": (keras.config.floatx(), keras.config.epsilon(),
                         keras.config.image_data_format()),
        "python_random": random.getstate(),
        "numpy_random": np.random.get_state(),
        "tf_seed": context.global_seed(),
        "keras_seed": (keras_state.get_global_attribute("global_random_seed"),
                       keras_state.get_global_attribute("global_seed_generator")),
        "logging": {name: (list(logger.handlers), logger.level)
                    for name, logger in loggers.items()},
        "streams": (sys.stdout, sys.stderr),
    }


def differences(before: dict, after: dict) -> list:
    """The names of the parts of two snapshots that differ."""
    def same(a, b):
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
            return all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.array_equal(a, b)
        return a is b or a == b
    return [key for key in before if key in after and not same(before[key], after[key])]


def restore(saved: dict) -> None:
    """Puts back every part of ``saved`` (a `snapshot`) that differs from now."""
    import keras
    import tensorflow as tf
    from keras.src.backend.common import global_state as keras_state
    changed = differences(saved, snapshot())
    if "dtype_policy" in changed:
        keras.mixed_precision.set_global_policy(saved["dtype_policy"])
    if "keras_config" in changed:
        floatx, epsilon, data_format = saved["keras_config"]
        keras.config.set_floatx(floatx)
        keras.config.set_epsilon(epsilon)
        keras.config.set_image_data_format(data_format)
    if "python_random" in changed:
        random.setstate(saved["python_random"])
    if "numpy_random" in changed:
        np.random.set_state(saved["numpy_random"])
    if "tf_seed" in changed:
        tf.random.set_seed(saved["tf_seed"])
    if "keras_seed" in changed:
        seed, generator = saved["keras_seed"]
        keras_state.set_global_attribute("global_random_seed", seed)
        keras_state.set_global_attribute("global_seed_generator", generator)
    if "logging" in changed:
        for name, (handlers, level) in saved["logging"].items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
    if "streams" in changed:
        sys.stdout, sys.stderr = saved["streams"]


@contextlib.contextmanager
def preserved():
    """Runs the block, then puts the process-global state back as it was (and closes
    the run's log file)."""
    from small_photo_classifier.workflow.base import console
    saved = snapshot()
    try:
        with console.own_transcript():
            yield
    finally:
        restore(saved)
