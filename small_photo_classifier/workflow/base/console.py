"""Shared plumbing of the absl entry points: quiet TensorFlow, logging, user errors."""

import contextlib
import logging
import os
import sys
import textwrap
import time

from small_photo_classifier.pipeline.errors import UserError


def quiet_tensorflow():
    """Hides TensorFlow C++ logs that respect TF_CPP_MIN_LOG_LEVEL; call before importing
    tensorflow. `load_tensorflow` hides the start-up lines that do not."""
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def verbose() -> bool:
    """``-v`` / ``--verbosity=N`` (N >= 1) on the command line: show TensorFlow's own
    logs. Read from sys.argv because it must be known before absl parses the flags."""
    for i, arg in enumerate(sys.argv[1:], 1):
        if arg in ("-v", "--verbosity") and i + 1 < len(sys.argv):
            value = sys.argv[i + 1]
        elif arg.startswith(("-v=", "--verbosity=")):
            value = arg.split("=", 1)[1]
        else:
            continue
        try:
            return int(value) >= 1
        except ValueError:
            return False
    return False


def load_tensorflow() -> None:
    """Imports TensorFlow and probes its devices with file descriptor 2 pointed at
    /dev/null. TensorFlow 2.17+ writes its start-up lines ("All log messages before
    absl::InitializeLog()", "oneDNN custom operations are on", "Could not find cuda
    drivers", "failed call to cuInit") from C++ before its logging is initialised, so
    TF_CPP_MIN_LOG_LEVEL cannot hide them. A real failure still raises, and its
    traceback is printed after the descriptor is restored. ``-v`` shows them."""
    if "tensorflow" in sys.modules:
        return
    with native_stderr_hidden():
        import tensorflow as tf
        tf.config.list_physical_devices()  # the CUDA probe logs here


@contextlib.contextmanager
def native_stderr_hidden():
    """Points file descriptor 2 at /dev/null for the block (unless ``-v``): C++ code that
    writes there directly (TensorFlow's start-up, the TFLite converter's summary) stays
    off the terminal. Python's own exceptions still surface after the block."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _NotRetracing(logging.Filter):
    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def expected_retracing():
    """Hides TensorFlow's retracing warning inside a block whose retracing is by design
    (say why where it is used); everywhere else the warning still shows a real leak."""
    tf_logger, rule = logging.getLogger("tensorflow"), _NotRetracing()
    tf_logger.addFilter(rule)
    try:
        yield
    finally:
        tf_logger.removeFilter(rule)


# Detail for the log file only (e.g. the model summary): never on the terminal.
DETAIL = logging.getLogger("detail")
DETAIL.propagate = False


@contextlib.contextmanager
def logs_to_file_only(*names: str):
    """Inside the block, the loggers ``names`` (a library's) write to the run's log file
    only, never the terminal: e.g. tf2onnx logs a warning with a traceback for every
    shape it cannot infer and every optimiser pass that does not apply, then goes on;
    the file it writes is checked numerically anyway."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [(l.propagate, list(l.handlers)) for l in loggers]
    for logger in loggers:
        logger.propagate = False
        # No log file yet (a library call outside a run): nowhere, not the terminal.
        logger.handlers[:] = list(DETAIL.handlers) or [logging.NullHandler()]
    try:
        yield
    finally:
        for logger, (propagate, handlers) in zip(loggers, saved):
            logger.propagate, logger.handlers[:] = propagate, handlers


class _Transcript:
    """The run's log file: every line the terminal showed plus the detail, held in
    memory until the run folder exists (so the opening lines are in it too)."""

    def __init__(self):
        self.pending, self.file, self.ended = [], None, False

    def write(self, text: str) -> None:
        if self.ended:  # a handler left on a logger by a run that has finished
            return
        if self.file is None:
            self.pending.append(text)
            return
        self.file.write(text)
        self.file.flush()

    def open(self, path: str) -> None:
        if self.file is not None:
            if self.file.name == path:
                return
            self.file.close()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")
        self.write("".join(self.pending))
        self.pending = []


class _Tee:
    """A text stream that also copies what it shows to the transcript: only whole text,
    never a terminal progress bar's redraws (carriage returns, ANSI colours)."""

    def __init__(self, stream, transcript: _Transcript):
        self._stream, self._transcript = stream, transcript

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        if "\r" not in text and "\x1b[" not in text:
            self._transcript.write(text)
        return n

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


class _TranscriptHandler(logging.Handler):
    """Log records in absl's full format (level, date, time, thread, file:line)."""

    def __init__(self, transcript: _Transcript):
        super().__init__(logging.DEBUG)
        from absl import logging as absl_logging
        self.setFormatter(absl_logging.PythonFormatter())
        self.transcript = transcript

    def emit(self, record):
        try:
            self.transcript.write(self.format(record) + "\n")
        except Exception:  # a log line must never stop the run
            self.handleError(record)


class _OurInfo(logging.Filter):
    """Libraries' INFO lines (absl's, TensorFlow's and tf2onnx's: checkpoint sharding,
    SavedModel fingerprints, graph optimisation passes) say nothing a user can act on;
    their warnings still pass. A filter on the handlers, because TensorFlow sets its
    loggers' levels again when it loads. Ours log through the root logger (and DETAIL)."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or record.name in ("root", DETAIL.name)


class _ShortFormatter(logging.Formatter):
    """``HH:MM:SS message`` for people; warnings and errors say so."""

    def format(self, record):
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{text}"


_STATE = {}


@contextlib.contextmanager
def own_transcript():
    """The block's run gets a log file of its own, closed when the block ends (the Python
    API: a second `train()` in a notebook starts its own); a transcript this process had
    before (a script's) is kept as it was."""
    before = _STATE.pop("transcript", None)
    try:
        yield
    finally:
        transcript = _STATE.pop("transcript", None)
        if transcript is not None:
            if transcript.file is not None:
                transcript.file.close()
            transcript.file, transcript.ended = None, True
        if before is not None:
            _STATE["transcript"] = before


def _transcript() -> _Transcript:
    if "transcript" not in _STATE:
        _STATE["transcript"] = _Transcript()
        handler = _TranscriptHandler(_STATE["transcript"])
        handler.addFilter(_OurInfo())
        logging.getLogger().addHandler(handler)
        DETAIL.addHandler(handler)
    return _STATE["transcript"]


def setup_logging(stream=None) -> None:
    """INFO and above reach the terminal as short lines; the run's log file gets every
    terminal line (prints too) plus the detail, with absl's full prefixes. ``stream``:
    where the short lines go (default the process's stderr; a notebook's cell output)."""
    from absl import logging as absl_logging
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    # TensorFlow's own INFO lines (e.g. each checkpoint's "Sharding callback duration")
    # say nothing a user can act on.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # e.g. SavedModel's fingerprint lines
    DETAIL.setLevel(logging.INFO)
    root.removeHandler(absl_logging.get_absl_handler())
    transcript = _transcript()
    # Not the tee: the file has the long form.
    terminal = logging.StreamHandler(stream or sys.__stderr__)
    terminal.setFormatter(_ShortFormatter())
    terminal.addFilter(_OurInfo())
    root.addHandler(terminal)
    # Prints go to this run's transcript (another run's tee in this process is unwrapped).
    sys.stdout = _Tee(sys.stdout._stream if isinstance(sys.stdout, _Tee) else sys.stdout,
                      transcript)
    sys.stderr = _Tee(sys.stderr._stream if isinstance(sys.stderr, _Tee) else sys.stderr,
                      transcript)


def command_line(default: str = "train.py") -> str:
    """This process's command as it can be pasted into a shell (``default``: the script
    named when the process was not started as one, e.g. the Python API)."""
    import shlex
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else default
    return " ".join(["python", script if script.endswith(".py") else default,
                     *(shlex.quote(a) for a in sys.argv[1:])])


def log_to_file(path: str) -> None:
    """From now on (and for everything shown before) the log goes to ``path``, appended."""
    _transcript().open(path)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every ``finally`` runs."""


# The signals this process received, in order: what an error that C code made of one
# (see `_wrapped_interrupt`) is recognised by.
_RECEIVED: list = []


def _on_sigterm(signum, frame):
    _RECEIVED.append("SIGTERM")
    raise Terminated()


def _on_sigint(signum, frame):
    _RECEIVED.append("SIGINT")
    raise KeyboardInterrupt()


def _wrapped_interrupt(err: BaseException):
    """(words, exit status) when ``err`` is an interrupt that C code wrapped, else None.

    A signal handler that raises while C code runs (numpy's ``__array__`` inside a
    TensorFlow conversion, say) surfaces as ``SystemError: ... returned a result with an
    exception set``; TensorFlow re-raises that ``from None``, which drops the interrupt
    from the chain. So a signal this process received decides; the chain is the
    fallback."""
    if _RECEIVED:
        return ("SIGTERM", 143) if _RECEIVED[-1] == "SIGTERM" else ("Ctrl-C / SIGINT", 130)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, Terminated):
            return "SIGTERM", 143
        if isinstance(err, KeyboardInterrupt):
            return "Ctrl-C / SIGINT", 130
        err = err.__cause__ or err.__context__
    return None


def _paragraphs(text: str) -> str:
    # Never inside a word: a path or a flag stays whole, to be copied.
    return "\n".join(textwrap.fill(line, 100, break_long_words=False, break_on_hyphens=False)
                     if len(line) > 100 and not line.startswith("  ") else line
                     for line in text.splitlines())


def _interrupted(what: str, status: int):
    from small_photo_classifier.pipeline import progress
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
    from small_photo_classifier.pipeline import diskspace
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C as Python's own handler would (KeyboardInterrupt), but recorded; a SIGINT
    # that the parent made this process ignore stays ignored.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
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
    except Exception as err:  # only a full disk (or a wrapped interrupt) is turned into a message here
        signal_error = _wrapped_interrupt(err)
        if signal_error is not None:
            _interrupted(*signal_error)
        filename = diskspace.disk_full_error(err)
        if filename is None:
            raise
        from small_photo_classifier.pipeline import progress
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
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)
        sys.unraisablehook = unraisable
