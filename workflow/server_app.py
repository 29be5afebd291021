"""The FastAPI application of serve.py (see `workflow.serving` for what it serves).

Safe by default: every route but the pages' own files needs the token when there is one
(``Authorization: Bearer``, the ``token`` cookie, or ``?token=`` once, which sets the
cookie); images come only from the run's own lists by opaque id; uploads are limited in
count and size and checked before any prediction; every error is a JSON 4xx naming what
was wrong, never a traceback; nothing is listed.
"""

import hmac
import os
import tempfile
from typing import List, Optional

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from workflow import serving


class Answer(BaseModel):
    """A label given on the label page."""
    id: str
    label: str


def create_app(workdir: str, token: Optional[str] = None, max_bytes: int = 20_000_000,
               max_files: int = 32, predictor=None) -> FastAPI:
    """The app for the run in ``workdir`` (``predictor``: a loaded `serving.Predictor`,
    else one is loaded here)."""
    predictor = predictor or serving.Predictor(workdir)
    app = FastAPI(title="invasive-vgg serve", version=serving.VERSION,
                  description=f"Predictions of the run {os.path.abspath(workdir)}.")
    _guard(app, token)
    _prediction_routes(app, predictor, max_bytes, max_files)
    _label_routes(app, predictor, serving.Reviews(workdir),
                  serving.Queue(workdir, predictor.task))
    return app


def _guard(app: FastAPI, token: Optional[str]) -> None:
    """The token check, and errors as JSON (never a traceback)."""

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        given = (request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                 or request.cookies.get("token") or request.query_params.get("token") or "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "This server needs its token: send "
                                          "'Authorization: Bearer <token>' or open "
                                          "the page once with ?token=<token>."}, 401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie("token", token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(serving.UploadError)
    async def upload_error(request: Request, err: serving.UploadError):
        return JSONResponse({"error": err.message}, err.status)

    @app.exception_handler(Exception)
    async def anything_else(request: Request, err: Exception):
        return JSONResponse({"error": f"{type(err).__name__}: {err}"}, 500)


def _prediction_routes(app: FastAPI, predictor, max_bytes: int, max_files: int) -> None:
    """The predict page, /api/health and /api/predict."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def predict_page():
        return _page("predict.html")

    @app.get("/api/health")
    def health():
        """The loaded model: file, classes, backbone, image size, version."""
        return predictor.health()

    @app.post("/api/predict")
    async def predict(files: List[UploadFile] = File(...), format: str = "json"):
        """Class probabilities of each uploaded image (multipart field ``files``), in the
        model's class order; ``?format=csv`` gives predict.py's CSV."""
        if len(files) > max_files:
            raise serving.UploadError(413, f"{len(files)} files in one request; at most "
                                           f"{max_files}.")
        loaded = []
        for f in files:
            data = await f.read(max_bytes + 1)
            loaded.append((os.path.basename(f.filename or "image"), data))
        # Decoding and the network block: off the event loop, so that other requests are
        # read meanwhile and join the next batch (`serving.Predictor.predict`).
        return await run_in_threadpool(_predict, predictor, loaded, format, max_files,
                                       max_bytes)


def _label_routes(app: FastAPI, predictor, reviews: serving.Reviews,
                  queue: serving.Queue) -> None:
    """The label page, its queue and images, and the answers."""

    @app.get("/label", response_class=HTMLResponse, include_in_schema=False)
    def label_page():
        return _page("label.html")

    @app.get("/api/queue")
    def get_queue():
        """The photos to label, in order, with the answers given so far."""
        answers = reviews.snapshot()
        return {"classes": list(predictor.task.class_names), "items": [
            {k: item[k] for k in ("id", "name", "source", "note", "label")}
            | {"answer": answers.get(item["name"], {}).get("label")} for item in queue.items]}

    @app.get("/image/{item_id}", include_in_schema=False)
    def image(item_id: str):
        path = queue.image_path(item_id)
        if path is None:
            return JSONResponse({"error": "No such image on this run's lists."}, 404)
        return FileResponse(path)

    @app.post("/api/labels")
    def answer(given: Answer):
        """Records a label for a photo of the queue (a second answer replaces the first)."""
        item = queue.by_id.get(given.id)
        if item is None:
            return JSONResponse({"error": f"No photo {given.id!r} in the queue."}, 404)
        if given.label not in predictor.task.class_names:
            return JSONResponse({"error": f"Unknown class {given.label!r}; the model's "
                                          f"classes: {list(predictor.task.class_names)}."}, 422)
        reviews.answer(item["name"], given.label, item["source"])
        return {"saved": item["name"], "label": given.label, "answered": len(reviews.rows)}

    @app.delete("/api/labels/{item_id}")
    def undo(item_id: str):
        """Removes the answer to a photo of the queue (undo)."""
        item = queue.by_id.get(item_id)
        if item is None:
            return JSONResponse({"error": f"No photo {item_id!r} in the queue."}, 404)
        return {"removed": reviews.undo(item["name"]), "answered": len(reviews.rows)}

    @app.get("/api/labels")
    def training_labels():
        """The answers in the training data's format (CSV text, or for class folders the
        moves and one command that applies them)."""
        result = serving.labels_for_training(predictor.info, queue, reviews.snapshot())
        if isinstance(result, str):
            return Response(result, media_type="text/csv")
        return result


def _predict(predictor, loaded, format: str, max_files: int, max_bytes: int):
    serving.check_uploads(loaded, max_files, max_bytes, predictor.image_size)
    names = [os.path.splitext(n)[0] for n, _ in loaded]
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, (name, data) in enumerate(loaded):
            path = os.path.join(folder, f"{i}_{name}")
            with open(path, "wb") as out:
                out.write(data)
            paths.append(path)
        probs, unfamiliar = predictor.predict(paths, names)
    if format == "csv":
        return Response(_csv(predictor, names, probs, unfamiliar), media_type="text/csv")
    return {"predictions": predictor.rows(names, probs, unfamiliar)}


def _page(name: str) -> str:
    with open(os.path.join(serving.PAGES, name), encoding="utf-8") as f:
        return f.read()


def _csv(predictor, names, probs, unfamiliar) -> str:
    """predict.py's CSV for these rows (`workflow.predicting.write_output`'s layout)."""
    from workflow.outputs import binary_column, write_predictions
    from workflow.predicting import unfamiliar_columns
    task = predictor.task
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "predictions.csv")
        write_predictions(names, probs, path, task.class_names,
                          binary_column(task.class_names, None,
                                        predictor.info.get("binary_column")),
                          extra=unfamiliar_columns(unfamiliar))
        with open(path, encoding="utf-8") as f:
            return f.read()
