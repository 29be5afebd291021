"""Who may talk to serve.py: the Host and Origin checks, as ASGI middleware.

A server on 127.0.0.1 is reachable by every page the user's browser opens. Without
these checks, another site could make the machine decode whatever it posts (a
multipart POST is a "simple" request: no preflight), and through DNS rebinding (a
hostile name that resolves to 127.0.0.1) read and change everything (OWASP's advice for
local web services). Every refusal is a JSON error and a line in the server's log.

* **Host**: only the names the server is meant to be reached by (loopback names, the
  bound address, ``--allowed_hosts``); any other ``Host`` gets 400, whatever the route.
* **Origin**: a request that changes something or costs work (POST, PUT, PATCH,
  DELETE, and the OPTIONS preflight of one) carrying an ``Origin`` (or, without one, a
  ``Referer``) that is not this server's own gets 403 and changes nothing. A request
  with neither comes from a program, not a page (browsers send ``Origin`` on every
  cross-site POST), and passes.

* **Size**: a ``Content-Length`` over the limit gets 413 here, before a byte of the body
  is read (as JSON; FastAPI's own answer to it is plain text). A body without one
  (chunked) is counted as it arrives by FastAPI's own limit (``FastAPI(max_body_size=
  ...)``, Starlette's ``RequestBodyLimitMiddleware``) and cut there with 413
  (`workflow.use.server_app`).
* **What a browser may do with an answer** (`SECURITY_HEADERS`, on every response,
  refusals included): no other site may frame a page (``frame-ancestors 'none'``,
  ``X-Frame-Options: DENY``: clickjacking the label page), a page runs only the
  server's own script files (no inline script, no plugin, no ``<base>``), a response is
  never sniffed into another type, and no page leaks its address to another site.
"""

import dataclasses
import json
import logging
from typing import FrozenSet, Optional, Tuple
from urllib.parse import urlsplit

from starlette.datastructures import Headers

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# Every response's headers. The pages' scripts are files the server serves itself
# (`/static/*.js`), so no inline script is allowed; their styles stay inline (a style
# runs nothing). blob: for the predict page's thumbnails of the user's own files.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' "
                           "'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; "
                           "object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = ((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"))
# FastAPI's /docs page loads Swagger UI's script and style from a CDN and starts it with
# an inline script: that page alone may, and it still cannot be framed.
DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline' "
               "https://cdn.jsdelivr.net; style-src 'self' 'unsafe-inline' "
               "https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# What changes something or costs work, and the preflight a browser sends before a
# cross-site request that is not "simple" (a JSON POST, a DELETE).
_CHANGES = ("POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclasses.dataclass(frozen=True)
class Guard:
    """Who may talk to the server: ``hosts`` (lower-case names, IPv6 without brackets),
    its ``port``, and the most bytes a request body may declare (``max_body``)."""
    hosts: FrozenSet[str]
    port: int
    max_body: Optional[int] = None

    @classmethod
    def for_server(cls, host: str, port: int, allowed: Tuple[str, ...] = (),
                   max_body: Optional[int] = None) -> "Guard":
        """The names a server bound to ``host`` answers to: loopback's, the bound address
        (unless it is every interface), and ``allowed``."""
        names = set(LOOPBACK_NAMES) | {bare(a) for a in allowed if a.strip()}
        if host not in ("0.0.0.0", "::", ""):
            names.add(bare(host))
        return cls(frozenset(n.lower() for n in names), int(port), max_body)

    def origin_is_ours(self, origin: str) -> bool:
        """Whether ``origin`` (``scheme://host[:port]``) is this server's own."""
        try:
            parts = urlsplit(origin)
            port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return False
        return (parts.scheme in ("http", "https") and parts.hostname is not None
                and parts.hostname.lower() in self.hosts and port == self.port)

    def refusal(self, method: str, headers: Headers) -> Optional[Tuple[int, str]]:
        """(status, why) when a request with these headers is refused, else None."""
        host = headers.get("host")
        if host is None or bare(host).lower() not in self.hosts:
            return 400, (f"This server does not answer to the host name {host!r}; it "
                         f"answers to {', '.join(sorted(self.hosts))} (serve.py "
                         "--allowed_hosts adds names).")
        if method in _CHANGES:
            origin = headers.get("origin")
            if origin is None and headers.get("referer"):
                parts = urlsplit(headers["referer"])
                origin = f"{parts.scheme}://{parts.netloc}"
            if origin is not None and not self.origin_is_ours(origin):
                return 403, (f"A {method} from a page of another site ({origin}) is "
                             "refused: only this server's own pages may change anything "
                             "or ask for predictions.")
        length = headers.get("content-length", "")
        if self.max_body is not None and length.isdigit() and int(length) > self.max_body:
            return 413, (f"The request body is {int(length) / 1e6:.1f} MB, over the "
                         f"{self.max_body / 1e6:g} MB one request may carry (serve.py "
                         "--max_request_mb): send fewer or smaller photos per request.")
        return None


def bare(host: str) -> str:
    """A host name or address without brackets or port ("[::1]:8000" -> "::1")."""
    host = host.strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class GuardMiddleware:
    """`Guard`'s checks before anything else runs (the token, the body, the routes).
    Not Starlette's ``TrustedHostMiddleware``: its refusal is plain text and unlogged,
    and it has no Origin check."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_security_headers(send, scope["path"] in ("/docs", "/docs/oauth2-redirect"))
        refused = self.guard.refusal(scope["method"], Headers(scope=scope))
        if refused is not None:
            status, message = refused
            logging.warning("Refused %s %s from %s: %s", scope["method"], scope["path"],
                            (scope.get("client") or ("?",))[0], message)
            return await _json(send, status, {"error": message})
        await self.app(scope, receive, send)


def _with_security_headers(send, docs: bool = False):
    """``send`` that adds `SECURITY_HEADERS` to the response's start (replacing any the
    app set)."""
    names = {name for name, _ in SECURITY_HEADERS}
    added = [(n, DOCS_POLICY.encode() if docs and n == b"content-security-policy" else v)
             for n, v in SECURITY_HEADERS]

    async def wrapped(message):
        if message["type"] == "http.response.start":
            headers = [(n, v) for n, v in message.get("headers", []) if n.lower() not in names]
            message = {**message, "headers": headers + added}
        await send(message)
    return wrapped


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
