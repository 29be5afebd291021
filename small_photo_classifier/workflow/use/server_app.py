"""The FastAPI application of serve.py (see `workflow.use.serving` for what it serves).

Safe by default, in the order a request meets it:

1. `workflow.use.web_guard`: a ``Host`` the server does not answer to gets 400, a POST,
   PUT or DELETE from a page of another site 403 (DNS rebinding, cross-site requests);
2. the token, when there is one: a valid one in any of ``Authorization: Bearer``, the
   cookie named for the port, or ``?token=`` (which sets the cookie, ``Path=/`` and
   host-only) is enough;
3. the body's size: a ``Content-Length`` over the limit gets 413 before anything is
   read (`web_guard`), and FastAPI's ``max_body_size`` cuts a chunked body at the limit;
4. each upload, while it streams (`LimitedParser`): counted, and cut at the per-file
   limit; then, under a decode slot shared by every request (`serving.DecodeSlots`:
   busy too long is 503 with ``Retry-After``), its pixel count read from its header,
   then decoded once (`serving.prepare_uploads`).

The label page's changes (POST, DELETE ``/api/labels``) also need the page's own token
(``X-Page-Token``, in the page the server sent): a script on another page cannot send
it. Images come only from the run's own lists by opaque id; every error is a JSON 4xx
naming what was wrong; an unexpected one is a 500 with an id and no detail (the details
go to the server's log); nothing is listed. Every response carries the headers of
`web_guard.SECURITY_HEADERS` (no framing, no inline script).
"""

import hmac
import logging
import os
import secrets
import tempfile
from dataclasses import replace
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from small_photo_classifier.workflow.use import serving, web_guard


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
    _token(app, config.token, config.port)
    page_token = secrets.token_urlsafe(24)
    _static_routes(app)
    slots = serving.DecodeSlots.for_config(config)
    _prediction_routes(app, predictor, config, slots)
    _explain_route(app, predictor, config, slots)
    reviews, queue = serving.Reviews(workdir), serving.Queue(workdir, predictor.task)
    _label_routes(app, predictor, reviews, queue, page_token)
    _answer_routes(app, predictor, reviews, queue, page_token)
    return web_guard.GuardMiddleware(app, web_guard.Guard.for_server(
        config.host, config.port, config.allowed_hosts, config.max_request_bytes))


def cookie_name(port: int) -> str:
    """The token's cookie, one per port: a cookie is sent to every port of a host, and
    another local service must neither receive this one nor overwrite it."""
    return f"serve_token_{int(port)}"


def _token(app: FastAPI, token: Optional[str], port: int) -> None:
    """The token check: a valid token in the header, the cookie or the query is enough
    (an unrelated ``Authorization`` header hides neither of the others)."""
    cookie = cookie_name(port)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = [header[len("Bearer "):].strip() if header.startswith("Bearer ") else "",
                 request.cookies.get(cookie, ""), request.query_params.get("token", "")]
        if not any(g and hmac.compare_digest(g.encode(), token.encode()) for g in given):
            return JSONResponse({"error": "This server needs its token: send "
                                          "'Authorization: Bearer <token>' or open "
                                          "the page once with ?token=<token>."}, 401)
        response = await call_next(request)
        if given[2]:
            response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
        return response


def _errors(app: FastAPI) -> None:
    """Errors as JSON: a bad request names what was wrong; anything unexpected is a 500
    with a short id, its details only in the server's log."""

    @app.exception_handler(serving.UploadError)
    async def upload_error(request: Request, err: serving.UploadError):
        return JSONResponse({"error": err.message}, err.status, headers=(
            {"Retry-After": str(err.retry_after)} if err.retry_after else None))

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


class LimitedParser(MultiPartParser):
    """Starlette's multipart parser with a limit per file, enforced while the body
    streams: a file over ``max_file_bytes`` stops the parsing there (413, naming it),
    before the rest of it is read or spooled. Starlette limits only the count of files
    and the size of plain fields."""

    def __init__(self, headers, stream, *, max_file_bytes: int, **limits):
        super().__init__(headers, stream, **limits)
        self.max_file_bytes, self._part_bytes = max_file_bytes, 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_headers_finished(self) -> None:
        try:
            super().on_headers_finished()
        except MultiPartException as err:
            if "Too many files" in str(err):
                raise serving.UploadError(413, f"More than {self.max_files} files in one "
                                               f"request; at most {self.max_files}.") from None
            raise

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is not None:
            self._part_bytes += end - start
            if self._part_bytes > self.max_file_bytes:
                raise serving.UploadError(413, f"{part.file.filename}: more than "
                                               f"{self.max_file_bytes / 1e6:.0f} MB; at most "
                                               "that per image (serve.py --max_upload_mb).")
        super().on_part_data(data, start, end)


# /api/predict's body, for the OpenAPI page (the route parses it itself, see above).
_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["files"], "properties": {"files": {
        "type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


async def _uploads(request: Request, config: serving.ServeConfig):
    """(the parsed form, its (name, file) pairs of the field ``files``): the body read
    under the upload limits (`LimitedParser`), a bad one refused with a 4xx."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise serving.UploadError(415, "Send the photos as multipart/form-data in the "
                                       "field 'files'.")
    try:
        form = await LimitedParser(request.headers, request.stream(),
                                   max_file_bytes=config.max_bytes,
                                   max_files=config.max_files, max_fields=8).parse()
    except MultiPartException as err:
        raise serving.UploadError(400, f"Malformed multipart body: {err.message}")
    return form, [(os.path.basename(f.filename or "image"), f.file)
                  for key, f in form.multi_items() if key == "files" and isinstance(f, UploadFile)]


def _prediction_routes(app: FastAPI, predictor, config: serving.ServeConfig,
                       slots: serving.DecodeSlots) -> None:
    """The predict page, /api/health and /api/predict."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def predict_page():
        return _page("predict.html")

    @app.get("/api/health")
    def health():
        """The loaded model: file, classes, backbone, image size, version."""
        return predictor.health()

    @app.post("/api/predict", openapi_extra=_UPLOAD_SCHEMA)
    async def predict(request: Request, format: str = "json"):
        """Class probabilities of each uploaded image (multipart field ``files``), in the
        model's class order; ``?format=csv`` gives predict.py's CSV."""
        form, files = await _uploads(request, config)
        try:
            # Decoding and the network block: off the event loop, so that other requests
            # are read meanwhile and join the next batch (`serving.Predictor.predict`).
            return await run_in_threadpool(_predict, predictor, files, format, config, slots)
        finally:
            await form.close()


def _explain_route(app: FastAPI, predictor, config: serving.ServeConfig,
                   slots: serving.DecodeSlots) -> None:
    @app.post("/api/explain", openapi_extra=_UPLOAD_SCHEMA,
              responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request):
        """One uploaded photo (multipart field ``files``) with the heatmap of the class the
        model predicts: where it looked (Grad-CAM on model.keras), as a PNG."""
        form, files = await _uploads(request, replace(config, max_files=1))
        try:
            return await run_in_threadpool(_explain, predictor, files, config, slots)
        finally:
            await form.close()


def _explain(predictor, loaded, config: serving.ServeConfig, slots) -> Response:
    image = serving.prepare_uploads(loaded, replace(config, max_files=1),
                                    predictor.image_size, slots)[0]
    name = os.path.splitext(loaded[0][0])[0]
    return Response(predictor.explain_png(image, name), media_type="image/png")


def _label_routes(app: FastAPI, predictor, reviews: serving.Reviews,
                  queue: serving.Queue, page_token: str) -> None:
    """The label page, its queue and images, and the answers so far as training labels
    (reads; the changes are `_answer_routes`')."""

    @app.get("/label", response_class=HTMLResponse, include_in_schema=False)
    def label_page():
        return _page("label.html", page_token)

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

    @app.get("/api/labels")
    def training_labels():
        """The answers in the training data's format (CSV text, or for class folders the
        moves and one command that applies them)."""
        result = serving.labels_for_training(predictor.info, queue, reviews.snapshot())
        if isinstance(result, str):
            return Response(result, media_type="text/csv")
        return result


def _answer_routes(app: FastAPI, predictor, reviews: serving.Reviews,
                   queue: serving.Queue, page_token: str) -> None:
    """Answers given and undone: only from this server's label page, which holds the page
    token (another site's page in the same browser cannot read it)."""

    def from_our_page(request: Request) -> Optional[JSONResponse]:
        given = request.headers.get("x-page-token", "")
        if hmac.compare_digest(given.encode(), page_token.encode()):
            return None
        return JSONResponse({"error": "Answers come from this server's label page: the "
                                      "request lacks its page token (X-Page-Token)."}, 403)

    @app.post("/api/labels")
    def answer(given: Answer, request: Request):
        """Records a label for a photo of the queue (a second answer replaces the first);
        needs the label page's ``X-Page-Token``."""
        refused = from_our_page(request)
        if refused is not None:
            return refused
        item = queue.by_id.get(given.id)
        if item is None:
            return JSONResponse({"error": f"No photo {given.id!r} in the queue."}, 404)
        if given.label not in predictor.task.class_names:
            return JSONResponse({"error": f"Unknown class {given.label!r}; the model's "
                                          f"classes: {list(predictor.task.class_names)}."}, 422)
        reviews.answer(item["name"], given.label, item["source"])
        return {"saved": item["name"], "label": given.label, "answered": len(reviews.rows)}

    @app.delete("/api/labels/{item_id}")
    def undo(item_id: str, request: Request):
        """Removes the answer to a photo of the queue (undo); needs the page's token."""
        refused = from_our_page(request)
        if refused is not None:
            return refused
        item = queue.by_id.get(item_id)
        if item is None:
            return JSONResponse({"error": f"No photo {item_id!r} in the queue."}, 404)
        return {"removed": reviews.undo(item["name"]), "answered": len(reviews.rows)}


def _predict(predictor, loaded, format: str, config: serving.ServeConfig, slots=None):
    images = serving.prepare_uploads(loaded, config, predictor.image_size, slots)
    names = [os.path.splitext(n)[0] for n, _ in loaded]
    probs, unfamiliar = predictor.predict(images)
    if format == "csv":
        return Response(_csv(predictor, names, probs, unfamiliar), media_type="text/csv")
    return {"predictions": predictor.rows(names, probs, unfamiliar)}


# The pages' scripts, served from files (the Content-Security-Policy allows no inline
# script): only these names, never a path from the request.
SCRIPTS = ("label.js", "predict.js")


def _static_routes(app: FastAPI) -> None:
    @app.get("/static/{name}", include_in_schema=False)
    def script(name: str):
        if name not in SCRIPTS:
            return JSONResponse({"error": "No such file."}, 404)
        return FileResponse(os.path.join(serving.PAGES, name),
                            media_type="text/javascript; charset=utf-8")


def _page(name: str, page_token: str = "") -> str:
    """A page, with its token (``{{page_token}}``, a URL-safe string) filled in."""
    with open(os.path.join(serving.PAGES, name), encoding="utf-8") as f:
        return f.read().replace("{{page_token}}", page_token)


def _csv(predictor, names, probs, unfamiliar) -> str:
    """predict.py's CSV for these rows (`workflow.use.predicting.write_output`'s layout)."""
    from small_photo_classifier.workflow.base.outputs import binary_column, write_predictions
    from small_photo_classifier.workflow.use.predicting import unfamiliar_columns
    task = predictor.task
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "predictions.csv")
        write_predictions(names, probs, path, task.class_names,
                          binary_column(task.class_names, None,
                                        predictor.info.get("binary_column")),
                          extra=unfamiliar_columns(unfamiliar))
        with open(path, encoding="utf-8") as f:
            return f.read()
