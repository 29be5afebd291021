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
import pytest

# pytest writes this one itself around every test phase.
_PYTEST_OWN = ("PYTEST_CURRENT_TEST",)


def snapshot() -> dict:
    """Everything global that tests or the tool's code are known to change: what the
    Python API puts back itself (`process_state`), the environment and absl's FLAGS."""
    from absl import flags
    from small_photo_classifier.workflow.base import process_state
    # Logging handlers and sys.stdout are pytest's own between tests (capture, caplog).
    return {
        **{k: v for k, v in process_state.snapshot().items()
           if k not in ("logging", "streams")},
        "environ": {k: v for k, v in os.environ.items() if k not in _PYTEST_OWN},
        "absl_flags": {name: flags.FLAGS[name].value for name in flags.FLAGS},
    }


def differences(before: dict, after: dict) -> list:
    """The names of the parts of two snapshots that differ."""
    from small_photo_classifier.workflow.base import process_state
    return process_state.differences(before, after)


def restore(saved: dict) -> None:
    """Puts back every part of ``saved`` (a `snapshot`) that differs from now."""
    from absl import flags
    from small_photo_classifier.workflow.base import process_state
    process_state.restore(saved)
    changed = differences(saved, snapshot())
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
