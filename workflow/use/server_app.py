"""The FastAPI application of serve.py (see `workflow.use.serving` for what it serves).

Safe by default, in the order a request meets it:

1. `workflow.use.web_guard`: a ``Host`` the server does not answer to gets 400, a POST,
   PUT or DELETE from a page of another site 403 (DNS rebinding, cross-site requests);
2. the token, when there is one (``Authorization: Bearer``, the ``token`` cookie, or
   ``?token=`` once, which sets the cookie);
3. the body's size: a ``Content-Length`` over the limit gets 413 before anything is
   read (`web_guard`), and FastAPI's ``max_body_size`` cuts a chunked body at the limit;
4. each upload: counted, measured, its pixel count read from its header, then decoded
   once (`serving.prepare_uploads`).

Images come only from the run's own lists by opaque id; every error is a JSON 4xx naming
what was wrong; an unexpected one is a 500 with an id and no detail (the details go to
the server's log); nothing is listed.
"""

import hmac
import logging
import os
import secrets
import tempfile
from typing import List, Optional

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from workflow.use import serving, web_guard


class Answer(BaseModel):
    """A label given on the label page."""
    id: str
    label: str


def create_app(workdir: str, config: serving.ServeConfig = serving.ServeConfig(),
               predictor=None):
    """The ASGI app for the run in ``workdir``: the FastAPI app inside the Host, Origin
    and size checks of `workflow.use.web_guard` (outside everything, FastAPI's own body
    limit included, so that what they refuse never reaches it). ``predictor``: a loaded
    `serving.Predictor`, else one is loaded here."""
    predictor = predictor or serving.Predictor(workdir)
    app = FastAPI(title="serve.py: predictions and labels of one run",
                  version=serving.VERSION,
                  description=f"Predictions of the run {os.path.basename(workdir)!r}.",
                  max_body_size=config.max_request_bytes,
                  # Files are counted (and refused by name) in the route; this bounds
                  # what the parser takes before that.
                  form_limits={"max_files": 2 * config.max_files + 1, "max_fields": 8})
    _errors(app)
    _token(app, config.token)
    _prediction_routes(app, predictor, config)
    _label_routes(app, predictor, serving.Reviews(workdir),
                  serving.Queue(workdir, predictor.task))
    return web_guard.GuardMiddleware(app, web_guard.Guard.for_server(
        config.host, config.port, config.allowed_hosts, config.max_request_bytes))


def _token(app: FastAPI, token: Optional[str]) -> None:
    """The token check."""

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


def _errors(app: FastAPI) -> None:
    """Errors as JSON: a bad request names what was wrong; anything unexpected is a 500
    with a short id, its details only in the server's log."""

    @app.exception_handler(serving.UploadError)
    async def upload_error(request: Request, err: serving.UploadError):
        return JSONResponse({"error": err.message}, err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = ("The request body is too large for this server (serve.py "
                   "--max_request_mb): send fewer or smaller photos per request."
                   if err.status_code == 413 else str(err.detail))
        return JSONResponse({"error": message}, err.status_code)

    @app.exception_handler(Exception)
    async def anything_else(request: Request, err: Exception):
        error_id = secrets.token_hex(4)
        logging.error("Error %s in %s %s", error_id, request.method, request.url.path,
                      exc_info=err)
        return JSONResponse({"error": f"Internal error {error_id}; the server's log has "
                                      "the details.", "id": error_id}, 500)


def _prediction_routes(app: FastAPI, predictor, config: serving.ServeConfig) -> None:
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
        if len(files) > config.max_files:
            raise serving.UploadError(413, f"{len(files)} files in one request; at most "
                                           f"{config.max_files}.")
        for f in files:  # measured by the parser, which spooled them: nothing read yet
            if f.size is not None and f.size > config.max_bytes:
                raise serving.UploadError(413, f"{f.filename}: {f.size / 1e6:.1f} MB; at "
                                               f"most {config.max_bytes / 1e6:.0f} MB per "
                                               "image.")
        loaded = [(os.path.basename(f.filename or "image"), await f.read()) for f in files]
        # Decoding and the network block: off the event loop, so that other requests are
        # read meanwhile and join the next batch (`serving.Predictor.predict`).
        return await run_in_threadpool(_predict, predictor, loaded, format, config)


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
        return {"classes": list(predictor.task.class_names), "empty": queue.empty, "items": [
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


def _predict(predictor, loaded, format: str, config: serving.ServeConfig):
    images = serving.prepare_uploads(loaded, config, predictor.image_size)
    names = [os.path.splitext(n)[0] for n, _ in loaded]
    probs, unfamiliar = predictor.predict(images)
    if format == "csv":
        return Response(_csv(predictor, names, probs, unfamiliar), media_type="text/csv")
    return {"predictions": predictor.rows(names, probs, unfamiliar)}


def _page(name: str) -> str:
    with open(os.path.join(serving.PAGES, name), encoding="utf-8") as f:
        return f.read()


def _csv(predictor, names, probs, unfamiliar) -> str:
    """predict.py's CSV for these rows (`workflow.use.predicting.write_output`'s layout)."""
    from workflow.base.outputs import binary_column, write_predictions
    from workflow.use.predicting import unfamiliar_columns
    task = predictor.task
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "predictions.csv")
        write_predictions(names, probs, path, task.class_names,
                          binary_column(task.class_names, None,
                                        predictor.info.get("binary_column")),
                          extra=unfamiliar_columns(unfamiliar))
        with open(path, encoding="utf-8") as f:
            return f.read()
