"""serve.py's web app: predictions over HTTP, and a page to label and review photos.

One process holds the run's default model (the one predict.py uses: bag or single, TTA
as chosen, calibration and unfamiliar score when the run has them) and answers:

* ``GET /`` — the predict page; ``POST /api/predict`` — multipart field ``files`` (one
  or many images) -> ``{"predictions": [...]}``, or with ``?format=csv`` the CSV
  predict.py writes; one thread runs the model on the requests waiting together, so
  concurrent clients each get their own answers;
* ``GET /label`` — the label page: the run's ``to_label.csv`` picks (rank order), then
  the photos ``suspect_labels.csv`` doubts; ``GET /api/queue``, ``GET /image/{id}``
  (an opaque id of a photo on those lists, never a path), ``POST /api/labels``,
  ``DELETE /api/labels/{id}`` (undo), ``GET /api/labels`` (the answers in the training
  CSV's format, or for class folders the moves that apply them);
* ``GET /api/health`` — model, classes, backbone, image size, version.

Every answer is written at once to ``RUN/labels/reviewed.csv``
(``name,label,source,time``, a second answer for a photo replaces the first) through a
temporary file and a rename, so a killed server leaves the last whole file.
"""

import contextlib
import csv
import dataclasses
import hashlib
import io
import shlex
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from small_photo_classifier.features.task import Task
from small_photo_classifier.pipeline import limits
from small_photo_classifier.pipeline.atomic import atomic_write_text
from small_photo_classifier.pipeline.errors import ConfigError

VERSION = "0.1.0"
REVIEWED = os.path.join("labels", "reviewed.csv")
PAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pages")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """serve.py's settings: where it listens and what it accepts.

    ``allowed_hosts``: host names beyond loopback's and the bound address that the
    server answers to; ``max_bytes``: per uploaded file; ``max_request_bytes``: per
    request body, enforced while it streams; ``max_pixels``: per image, from its header
    before any decoding."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    allowed_hosts: Tuple[str, ...] = ()
    max_bytes: int = 20_000_000
    max_files: int = 32
    max_request_bytes: int = 100_000_000
    max_pixels: int = limits.MAX_PIXELS


class UploadError(Exception):
    """A bad upload: answered with ``status`` and a JSON body naming the file;
    ``retry_after`` (seconds) for a server too busy to take it now (503)."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


# Memory photos may take while they decode, across every request at once: a decoding
# photo holds its file and its 8-bit pixels (3 bytes each; the resize reads them in
# 8 bits, `pipeline.ops.resize_image`). Bodies waiting for a slot stay where the
# multipart parser spooled them (disk above 1 MB), so they count for little.
DECODE_MEMORY = 1 << 30
# How long a photo waits for a slot before its request is answered 503.
DECODE_WAIT_S = 20.0


class DecodeSlots:
    """At most ``slots`` photos decode at once across all requests; the rest wait (up to
    ``wait_s``), then their request gets 503 with ``Retry-After`` instead of taking the
    machine's memory (a handful of clients posting 90-megapixel PNGs would)."""

    def __init__(self, slots: int, wait_s: float = DECODE_WAIT_S):
        self.slots, self.wait_s = slots, wait_s
        self._free = threading.BoundedSemaphore(slots)

    @classmethod
    def for_config(cls, config: "ServeConfig") -> "DecodeSlots":
        """As many slots as `DECODE_MEMORY` holds of the largest photo ``config`` accepts
        (its file plus 3 bytes a pixel), at most one per core, at least one."""
        per_photo = config.max_bytes + 3 * config.max_pixels
        return cls(max(1, min(os.cpu_count() or 1, DECODE_MEMORY // per_photo)))

    def __enter__(self):
        if not self._free.acquire(timeout=self.wait_s):
            raise UploadError(503, f"The server is decoding {self.slots} photo(s) already and "
                                   f"none finished within {self.wait_s:g} s: try again "
                                   "shortly.", retry_after=5)
        return self

    def __exit__(self, *exc):
        self._free.release()


class Predictor:
    """The run's default model, loaded once; `predict` is what predict.py computes."""

    def __init__(self, workdir: str, batch_size: int = 16):
        from small_photo_classifier.workflow.use import loaded
        self.workdir, self.batch_size = workdir, batch_size
        self.run = loaded.load(workdir)  # what predict.py loads: the same numbers
        self.task, self.info, self.units = self.run.task, self.run.info, self.run.units
        self.model, self.reference = self.run.model, self.run.reference
        self.use_bag, self.tta, self.image_size = (self.run.use_bag, self.run.tta,
                                                   self.run.image_size)
        # Requests that arrive while a batch is computed wait here and go through the
        # network together: one pipeline and one call for all of them, each request's
        # rows handed back to it (answers never mix: each job keeps its own rows).
        self.waiting: List[dict] = []
        self.ready = threading.Condition()
        self.explainer, self.explaining = None, threading.Lock()
        threading.Thread(target=self._serve_batches, daemon=True,
                         name="predict-batches").start()

    def health(self) -> dict:
        from small_photo_classifier.features.serve import inference
        # The run folder's name, not its path (nor a backbone file's): nothing about the
        # machine's folders.
        from small_photo_classifier.features import trust
        backbone = self.info.get("backbone")
        calibration = trust.Calibration.from_json(self.info.get("calibration"))
        return {"model": inference.BAG_FILE if self.use_bag else inference.MODEL_FILE,
                "run": os.path.basename(os.path.abspath(self.workdir)), "task": self.task.kind,
                "classes": list(self.task.class_names),
                "backbone": os.path.basename(backbone) if backbone else backbone,
                "image_size": self.image_size, "tta": self.tta, "version": VERSION,
                # A map fitted but not applied (it did not lower the log loss) is "none".
                "calibrated": calibration.kind != "none",
                "unfamiliar": self.reference is not None}

    def predict(self, images: np.ndarray):
        """(probabilities, unfamiliar or None) of images through the eval path
        (`prepare_uploads`), as predict.py gives for their files; safe to call from many
        threads at once (their images are batched together)."""
        job = {"images": images, "done": threading.Event()}
        with self.ready:
            self.waiting.append(job)
            self.ready.notify()
        job["done"].wait()
        if "error" in job:
            raise job["error"]
        return self.run.apply(job["outputs"])

    def explain_png(self, image: np.ndarray, name: str) -> bytes:
        """One upload (through the eval path) with the heatmap of the class the single
        model predicts (`workflow.use.explaining`), as a PNG. The model for heatmaps is
        loaded at the first request and kept; one heatmap at a time."""
        from small_photo_classifier.workflow.use import explaining
        with self.explaining:
            if self.explainer is None:
                self.explainer = explaining.Explainer(self.workdir, self.info)
            explained = self.explainer.explain_eval(image)
            return explaining.png(explained, f"{name}: where model.keras saw "
                                             f"{explained.class_name}")

    def _serve_batches(self, most: int = 64) -> None:
        """The one thread that runs the model: takes every waiting request (up to
        ``most`` images), predicts them in one pass, hands each its own rows."""
        while True:
            with self.ready:
                while not self.waiting:
                    self.ready.wait()
                jobs, count = [], 0
                while self.waiting and (not jobs or count + len(self.waiting[0]["images"])
                                        <= most):
                    jobs.append(self.waiting.pop(0))
                    count += len(jobs[-1]["images"])
            try:
                out = self.run.predict_images(np.concatenate([job["images"] for job in jobs]),
                                              self.batch_size)
                start = 0
                for job in jobs:
                    job["outputs"] = out[start:start + len(job["images"])]
                    start += len(job["images"])
            except Exception as err:  # handed to every waiting request, not lost
                for job in jobs:
                    job["error"] = err
            for job in jobs:
                job["done"].set()

    def rows(self, names: List[str], probs, unfamiliar) -> List[dict]:
        """One JSON object per image: probabilities by class, the top class, flags."""
        task, out = self.task, []
        thresholds = self.info.get("thresholds")
        for i, name in enumerate(names):
            p = np.asarray(probs[i], np.float64)
            if task.kind == "binary":
                by_class = {task.class_names[0]: float(1 - p), task.class_names[1]: float(p)}
                top = task.class_names[int(task.predicted(np.array([p]), thresholds)[0])]
            else:
                by_class = {c: float(v) for c, v in zip(task.class_names, p)}
                top = (task.class_names[int(np.argmax(p))] if task.kind == "multiclass" else
                       [c for c, h in zip(task.class_names, task.predicted(p[None], thresholds)[0])
                        if h])
            row = {"name": name, "probabilities": by_class, "top_class": top}
            if task.kind == "binary":
                row[f"P({task.positive_class})"] = float(p)
            if unfamiliar is not None:
                row["unfamiliar_score"] = float(unfamiliar["score"][i])
                row["unfamiliar"] = bool(unfamiliar["flagged"][i])
            out.append(row)
        return out


def prepare_uploads(files: List[tuple], config: ServeConfig, image_size: int,
                    slots: Optional[DecodeSlots] = None) -> np.ndarray:
    """The uploaded images through the eval path ([N, S, S, 3]), each read and decoded
    once, under a decode slot (`DecodeSlots`); a bad upload is refused before any
    prediction (each named), its status by what is wrong: none (400), too many or one
    too large in bytes or in pixels (413, its header says, before decoding), one that
    is not a JPEG or PNG, whose header does not give its size, or that does not decode
    (415). ``files``: (name, bytes or a binary file object)."""
    import tensorflow as tf
    from small_photo_classifier.pipeline import input as input_lib, scan
    if not files:
        raise UploadError(400, "No images: send them in the multipart field 'files'.")
    if len(files) > config.max_files:
        raise UploadError(413, f"{len(files)} files in one request; at most "
                               f"{config.max_files}.")
    images = []
    for name, source in files:
        with slots or contextlib.nullcontext():
            data = source if isinstance(source, bytes) else source.read(config.max_bytes + 1)
            if len(data) > config.max_bytes:
                raise UploadError(413, f"{name}: more than {config.max_bytes / 1e6:.0f} MB; "
                                       "at most that per image.")
            unsupported = scan.signature_problem(data) or scan.unreadable_size(data)
            if unsupported:
                raise UploadError(415, f"{name} {unsupported}: expected a JPEG or PNG photo.")
            oversized = scan.too_many_pixels(data, config.max_pixels)
            if oversized:
                raise UploadError(413, f"{name} {oversized}.")
            try:
                images.append(input_lib.image_from_bytes(data, image_size).numpy())
            except tf.errors.OpError as err:
                raise UploadError(415, f"{name} cannot be decoded: truncated or corrupt "
                                       f"({scan.clean_error(err)}); expected a JPEG or PNG "
                                       "photo.") from None
            del data
    return np.stack(images)


class Reviews:
    """``labels/reviewed.csv``: one row per photo answered, rewritten whole and atomically
    on every answer (a few thousand rows at most: cheap, and a kill leaves a whole file)."""

    COLUMNS = ["name", "label", "source", "time"]

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, REVIEWED)
        self.lock = threading.Lock()
        self.rows: Dict[str, dict] = {}
        if os.path.isfile(self.path):
            table = pd.read_csv(self.path, dtype=str, keep_default_na=False)
            self.rows = {r["name"]: dict(r) for r in table.to_dict("records")}

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows.values())
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_write_text(self.path, buffer.getvalue())

    def answer(self, name: str, label: str, source: str) -> None:
        with self.lock:
            self.rows.pop(name, None)  # a second answer replaces the first (and moves last)
            self.rows[name] = {"name": name, "label": label, "source": source,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._write()

    def undo(self, name: str) -> bool:
        with self.lock:
            if self.rows.pop(name, None) is None:
                return False
            self._write()
            return True

    def snapshot(self) -> Dict[str, dict]:
        with self.lock:
            return dict(self.rows)


def _within(path: str, roots: List[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r + os.sep) for r in roots)


class Queue:
    """The photos to look at, from the run's own lists, each under an opaque id."""

    def __init__(self, workdir: str, task: Task):
        from small_photo_classifier.workflow.base.outputs import read_json
        self.items: List[dict] = []
        config = read_json(os.path.join(workdir, "run_config.json"))
        later = read_json(os.path.join(workdir, "run_config_label_next.json"))
        self.data_dir = config.get("data_dir") or ""
        roots = [d for d in (self.data_dir, later.get("unlabelled_dir"),
                             config.get("unlabelled_dir")) if d]
        self.roots = [os.path.realpath(d) for d in roots]
        self._add(os.path.join(workdir, "to_label.csv"), "label_next", task, workdir)
        self._add(os.path.join(workdir, "suspect_labels.csv"), "suspect", task, workdir)
        self.by_id = {item["id"]: item for item in self.items}
        self.empty = self._why_empty(workdir, later)

    @staticmethod
    def _why_empty(workdir: str, label_next: dict) -> str:
        """What an empty queue means for this run, in words that are true of it."""
        from small_photo_classifier.workflow.base.outputs import read_json
        audit = read_json(os.path.join(workdir, "metrics.json")).get("label_audit")
        said = ("The label audit (" + audit.get("by", "out-of-fold predictions")
                + ") found no training label that looks wrong." if audit else
                "No label audit ran on this run (it needs cross-validation: --cv_folds).")
        if label_next:
            return said + " --stage=label_next chose no photos to label."
        return said + (" To choose photos to label next, run train.py --stage=label_next "
                       "--unlabelled_dir=<folder of unlabelled photos> on this run.")

    def _add(self, path: str, source: str, task: Task, workdir: str) -> None:
        if not os.path.isfile(path):
            return
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "rank" in table:
            table = table.iloc[np.argsort(pd.to_numeric(table["rank"], errors="coerce")
                                          .fillna(1e9).to_numpy(), kind="stable")]
        for row in table.to_dict("records"):
            item_path = row.get("path", "")
            digest = hashlib.sha256(f"{workdir}\0{source}\0{item_path}".encode()).hexdigest()
            note = row.get("reason", "")
            if source == "suspect":
                note = (f"labelled {row.get('given') or row.get('label')}, the model says "
                        f"{row.get('predicted')} with {float(row.get('confidence') or 0):.2f}")
            self.items.append({"id": digest[:20], "name": row["name"], "path": item_path,
                               "source": source, "note": note,
                               "label": row.get("given") or row.get("label") or ""})

    def relative(self, path: str) -> str:
        """``path`` relative to the data folder, or ``$UNLABELLED/...`` for a photo of
        the unlabelled folder; never a folder of the machine."""
        real = os.path.realpath(path)
        data = os.path.realpath(self.data_dir) if self.data_dir else None
        if data and (real == data or real.startswith(data + os.sep)):
            return os.path.relpath(real, data)
        for root in self.roots:
            if real.startswith(root + os.sep):
                return "$UNLABELLED/" + os.path.relpath(real, root)
        return os.path.basename(path)

    def image_path(self, item_id: str) -> Optional[str]:
        """The photo of ``item_id`` when it is on the lists and inside the data folders
        (a symlink out of them is refused); else None."""
        item = self.by_id.get(item_id)
        if item is None or not os.path.isfile(item["path"]):
            return None
        return item["path"] if _within(item["path"], self.roots) else None


def labels_for_training(info: dict, queue: Queue, rows: Dict[str, dict]):
    """The answers as the training data takes them: CSV text for a labels CSV layout, or
    the moves (and one shell command) for class folders."""
    task = Task.of_model(info)
    answered = [r for r in rows.values() if r["label"] in task.class_names]
    if info.get("layout") == "folders":
        # Paths relative to the data folder (the page and the API name no folder of the
        # machine, as /api/health does not): a photo of the unlabelled folder is
        # written as "$UNLABELLED/<path in it>".
        by_name = {i["name"]: i for i in queue.items}
        moves = [{"name": r["name"], "from": queue.relative(by_name[r["name"]]["path"]),
                  "to": r["label"]} for r in answered if r["name"] in by_name]
        lines = [f"mkdir -p {shlex.quote(m['to'])} && mv {_shell_path(m['from'])} "
                 f"{shlex.quote(m['to'])}/" for m in moves]
        if any(m["from"].startswith("$UNLABELLED/") for m in moves):
            lines.insert(0, "UNLABELLED=<the folder given to --stage=label_next "
                            "--unlabelled_dir>")
        return {"layout": "folders", "moves": moves,
                "run_in": "the data folder (train.py --data_dir)",
                "command": "\n".join(lines)}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if task.kind == "binary":
        column = info.get("binary_column") or "label"
        writer.writerow(["name", column])
        writer.writerows([r["name"], task.class_names.index(r["label"])] for r in answered)
    else:
        writer.writerow(["name", "label"])
        writer.writerows([r["name"], r["label"]] for r in answered)
    return buffer.getvalue()


def _shell_path(path: str) -> str:
    if path.startswith("$UNLABELLED/"):
        return '"$UNLABELLED"/' + shlex.quote(path[len("$UNLABELLED/"):])
    return shlex.quote(path)


def check_host(host: str, token: Optional[str]) -> Optional[str]:
    """The token to require: None on loopback without --token; off loopback --token or a
    generated one (printed once by serve.py)."""
    if token:
        return token
    if host in LOOPBACK:
        return None
    import secrets
    return secrets.token_urlsafe(24)


def config_from(host: str, port: int, token: Optional[str], allowed_hosts, sizes) -> ServeConfig:
    """serve.py's flags as a `ServeConfig` (checked before TensorFlow starts). ``sizes``:
    (max_upload_mb, max_files, max_request_mb, max_pixels)."""
    max_upload_mb, max_files, max_request_mb, max_pixels = sizes
    if min(max_upload_mb, max_files, max_request_mb, max_pixels) <= 0:
        raise ConfigError("--max_upload_mb, --max_files, --max_request_mb and --max_pixels "
                          "must be positive.")
    allowed = [h.strip() for h in allowed_hosts if h.strip()]
    if host in ("0.0.0.0", "::"):  # every interface: the machine's own names too
        import socket
        name = socket.gethostname()
        allowed += [name, socket.getfqdn()]
        try:
            allowed += socket.gethostbyname_ex(name)[2]
        except OSError:
            pass
    return ServeConfig(host, int(port), check_host(host, token), tuple(dict.fromkeys(allowed)),
                       int(max_upload_mb * 1e6), int(max_files), int(max_request_mb * 1e6),
                       int(max_pixels))
