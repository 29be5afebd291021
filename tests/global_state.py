"""Process-global state that a test (or a fixture of any scope) may change, put back.

Keras' dtype policy and config, the random seeds (Python, NumPy, TensorFlow, Keras),
the environment and absl's FLAGS belong to the process, not to a test. Under
pytest-xdist one worker runs many modules one after the other, so a change left behind
by one test (or by a module-scoped fixture: serve's `Predictor` applies
``--precision=auto``, which is ``mixed_bfloat16`` on an AVX512-BF16 CPU) changes the
numbers of whichever test that worker runs next, and only on some machines.

`restore_global_state` (autouse, imported by ``tests/conftest.py``) puts everything back
to what the session started with before and after every test, so each test starts
from the same world whatever ran before it, fixtures included.
"""

import os
import random

import numpy as np
import pytest

# pytest writes this one itself around every test phase.
_PYTEST_OWN = ("PYTEST_CURRENT_TEST",)


def snapshot() -> dict:
    """Everything global that tests or the tool's code are known to change."""
    import keras
    from absl import flags
    from keras.src.backend.common import global_state as keras_state
    from tensorflow.python.eager import context
    return {
        "dtype_policy": keras.mixed_precision.global_policy().name,
        "keras_config": (keras.config.floatx(), keras.config.epsilon(),
                         keras.config.image_data_format()),
        "python_random": random.getstate(),
        "numpy_random": np.random.get_state(),
        "tf_seed": context.global_seed(),
        "keras_seed": (keras_state.get_global_attribute("global_random_seed"),
                       keras_state.get_global_attribute("global_seed_generator")),
        "environ": {k: v for k, v in os.environ.items() if k not in _PYTEST_OWN},
        "absl_flags": {name: flags.FLAGS[name].value for name in flags.FLAGS},
    }


def differences(before: dict, after: dict) -> list:
    """The names of the parts of two snapshots that differ."""
    def same(a, b):
        if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
            return all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.array_equal(a, b)
        return a is b or a == b
    return [key for key in before if not same(before[key], after[key])]


def restore(saved: dict) -> None:
    """Puts back every part of ``saved`` (a `snapshot`) that differs from now."""
    import keras
    import tensorflow as tf
    from absl import flags
    from keras.src.backend.common import global_state as keras_state
    now = snapshot()
    changed = differences(saved, now)
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
    if "environ" in changed:
        for key in [k for k in os.environ if k not in saved["environ"]
                    and k not in _PYTEST_OWN]:
            del os.environ[key]
        os.environ.update(saved["environ"])
    if "absl_flags" in changed:
        for name in flags.FLAGS:
            if name in saved["absl_flags"] and \
                    flags.FLAGS[name].value != saved["absl_flags"][name]:
                flags.FLAGS[name].value = saved["absl_flags"][name]


@pytest.fixture(scope="session")
def session_global_state():
    """The global state the session started with (before any test or fixture ran)."""
    return snapshot()


@pytest.fixture(autouse=True)
def restore_global_state(session_global_state):
    """Before and after every test: the session's starting global state, whatever a test
    or a fixture of a wider scope changed."""
    restore(session_global_state)
    yield
    restore(session_global_state)
