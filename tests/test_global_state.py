"""Tests leave the world as they found it (tests/global_state.py)."""

import textwrap

# An inner session with this suite's fixtures, where each test and a module fixture
# change the global state and later tests check they see the session's own.
INNER = '''
import os, random
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from tests.global_state import restore_global_state, session_global_state  # noqa

flags.DEFINE_string("inner_flag", "default", "a flag the tests change")


@pytest.fixture(scope="module")
def leaky_module_fixture():
    # What serve's Predictor did: apply --precision=auto (mixed_bfloat16 on some CPUs).
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    return "built"


def test_1_changes_everything():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.config.set_floatx("float16")
    keras.utils.set_random_seed(123)
    os.environ["LEFT_BEHIND"] = "1"
    flags.FLAGS.mark_as_parsed()
    flags.FLAGS.inner_flag = "changed"


def test_2_sees_the_sessions_state():
    assert keras.mixed_precision.global_policy().name == "float32"
    assert keras.config.floatx() == "float32"
    assert "LEFT_BEHIND" not in os.environ
    assert flags.FLAGS["inner_flag"].value == "default"
    assert tf.random.uniform(()).dtype == tf.float32


def test_3_a_module_fixture_changes_the_policy(leaky_module_fixture):
    assert keras.mixed_precision.global_policy().name == "float32"


def test_4_random_draws_start_from_the_same_state():
    np.random.seed(7)
    random.seed(7)


def test_5_the_seed_is_not_inherited():
    assert keras.layers.Dense(2).compute_dtype == "float32"
    # test_4's seeding is gone: a draw differs from a fresh seed-7 draw.
    first = np.random.random()
    np.random.seed(7)
    assert first != np.random.random()
'''


def test_no_test_or_fixture_leaves_the_dtype_policy_or_other_global_state(pytester):
    pytester.makepyfile(test_inner=textwrap.dedent(INNER))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                                          "-p", "no:xdist", "-p", "no:benchmark")
    result.assert_outcomes(passed=5)


def test_the_snapshot_sees_each_part_change():
    import os

    import keras
    import numpy as np
    from tests import global_state
    before = global_state.snapshot()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    os.environ["GLOBAL_STATE_PROBE"] = "1"
    np.random.seed(3)
    try:
        changed = global_state.differences(before, global_state.snapshot())
        assert {"dtype_policy", "environ", "numpy_random"} <= set(changed)
    finally:
        global_state.restore(before)
    assert global_state.differences(before, global_state.snapshot()) == []
    assert keras.mixed_precision.global_policy().name == "float32"
