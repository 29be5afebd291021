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


# Detail for the log file only (e.g. the model summary): never on the terminal.
DETAIL = logging.getLogger("detail")
DETAIL.propagate = False


def setup_logging() -> None:
    """INFO and above reach the terminal (absl's handler) and the run's log file."""
    logging.getLogger().setLevel(logging.INFO)
    # TensorFlow's own INFO lines (e.g. each checkpoint's "Sharding callback duration")
    # say nothing a user can act on.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    DETAIL.setLevel(logging.INFO)


def log_to_file(path: str) -> None:
    """Also writes everything logged, and the detail, to ``path`` (appending)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    DETAIL.addHandler(handler)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every ``finally`` runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _paragraphs(text: str) -> str:
    return "\n".join(textwrap.fill(line, 100) if len(line) > 100 and not line.startswith("  ")
                     else line for line in text.splitlines())


def _interrupted(what: str, status: int):
    from pipeline import progress
    lines = progress.summary()
    print(f"interrupted ({what}): every output written so far is complete (files are only "
          "renamed into place when whole)." + (f" A rerun will:\n{lines}" if lines else
                                                " Rerun to start again."), file=sys.stderr)
    sys.exit(status)


@contextlib.contextmanager
def user_errors():
    """Turns the ways a run can stop into one paragraph and an exit status, never a
    traceback: a UserError (2), a full disk (3), Ctrl-C (130), SIGTERM (143)."""
    import signal
    from pipeline import diskspace
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    unraisable = sys.unraisablehook

    def quiet_disk_full(info):
        # After a write hit a full disk, h5py objects fail again as they are freed;
        # that is the same error, reported once below, not a new traceback.
        if diskspace.disk_full_error(info.exc_value) is None:
            unraisable(info)

    sys.unraisablehook = quiet_disk_full
    try:
        yield
    except UserError as err:
        print("error: " + _paragraphs(str(err)), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted("Ctrl-C / SIGINT", 130)
    except Terminated:
        _interrupted("SIGTERM", 143)
    except Exception as err:  # only a full disk is turned into a message here
        filename = diskspace.disk_full_error(err)
        if filename is None:
            raise
        from pipeline import progress
        lines = progress.summary()
        print("error: " + _paragraphs(diskspace.disk_full_message(filename))
              + (f"\nA rerun will:\n{lines}" if lines else ""), file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        logging.shutdown()
        # HDF5 that failed to write cannot close its files, and would crash the
        # interpreter at exit; everything of ours is already closed or removed.
        os._exit(3)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = unraisable
