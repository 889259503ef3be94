"""The service's door: a plain ASGI middleware in front of the app. Torch-free.

Before a request reaches the app (and before its body is read) it checks the
token on every /api/ route when one is set (401) and refuses a body whose
Content-Length is over the upload limit (413). A body without a length
(chunked) is counted while the app reads it, and reading stops with 413 at
the limit, so an upload is never buffered whole before being refused. It
also counts the requests in flight, which /healthz reports.
"""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROTECTED = "/api/"


class TooLarge(HTTPException):
    """Raised from `receive` when a body passes the limit; FastAPI passes an
    HTTPException through its body parsing, so the client gets this 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the upload limit of {limit / 2**20:g} MB "
                              "(elcell serve --max-upload-mb)")


class Guard:
    def __init__(self, app: ASGIApp, token: str | None = None, max_body: int = 50 * 2**20):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.token and path.startswith(PROTECTED) and not self._authorised(headers):
            await _json(send, 401, "missing or wrong token: send the header 'Authorization: Bearer <token>' "
                                   "(elcell serve --token / ELCELL_TOKEN)",
                        [(b"www-authenticate", b'Bearer realm="elcell"')])
            return
        length = headers.get("content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _json(send, 413, TooLarge(self.max_body).detail, [(b"connection", b"close")])
            return
        counted = path != "/healthz"
        self.in_flight += counted
        started = False
        total = 0

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_body:
                    raise TooLarge(self.max_body)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except TooLarge as err:  # raised outside the app's own error handling
            if started:
                raise
            await _json(send, 413, err.detail, [(b"connection", b"close")])
        finally:
            self.in_flight -= counted

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token)


async def _json(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
