"""Shared plumbing of the absl entry points: quiet TensorFlow, logging, user errors."""

import contextlib
import logging
import os
import sys
import textwrap

from pipeline.errors import UserError


def quiet_tensorflow():
    """Hides TensorFlow C++ logs (e.g. a failed CUDA probe on CPU machines); call before
    importing tensorflow. Real failures still surface as Python exceptions."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def log_to_file(path: str) -> None:
    """Also writes everything logged to ``path`` (appending)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)


@contextlib.contextmanager
def user_errors():
    """Turns a UserError into a one-paragraph message and exit status 2 (no traceback)."""
    try:
        yield
    except UserError as err:
        text = str(err)
        paragraphs = [textwrap.fill(line, 100) if len(line) > 100 and not line.startswith("  ")
                      else line for line in text.splitlines()]
        print("error: " + "\n".join(paragraphs), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are complete; rerun to resume.",
              file=sys.stderr)
        sys.exit(130)
