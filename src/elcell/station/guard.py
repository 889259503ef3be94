"""The service's door: a plain ASGI middleware in front of the app. Torch-free.

Before a request reaches the app (and before its body is read) it checks the
Host header against the names the station serves (400: a web page elsewhere
that rebinds its own DNS name to this machine's address sends its own name,
so it cannot use the station from a browser behind the firewall), checks the
token on every /api/ route when one is set (401) and refuses a body whose
Content-Length is over the upload limit (413). A body without a length
(chunked) is counted while the app reads it, and reading stops with 413 at
the limit, so an upload is never buffered whole before being refused. It
also counts the requests in flight, which /healthz reports.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from elcell.errors import DataError

PROTECTED = "/api/"
LOOPBACK = ("localhost", "127.0.0.1", "::1")  # the names a station always answers to
_NAME = re.compile(r"[a-z0-9_.:%-]+")  # host names, IPv4 and IPv6 addresses (with a zone)


def host_name(header: str) -> str:
    """The host a Host header names: lower case, without its port, the brackets of
    an IPv6 address or a trailing dot ('[::1]:8000' -> '::1', 'Station.:80' -> 'station')."""
    value = header.strip().lower()
    if value.startswith("["):
        address, bracket, rest = value[1:].partition("]")
        if bracket and (not rest or (rest[0] == ":" and rest[1:].isdigit())):
            return address
        return value
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        if port.isdigit():
            value = name
    return value.rstrip(".")


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the station on this machine."""
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def served_hosts(host: str, allowed: Iterable[str] = ()) -> frozenset[str]:
    """The names a station listening on `host` answers to: the loopback names, `host`
    and the names the operator allowed (elcell serve --allowed-host)."""
    names = {*LOOPBACK, host_name(host)}
    for name in allowed:
        clean = host_name(name)
        if not _NAME.fullmatch(clean):
            raise DataError(f"--allowed-host {name!r}: give a host name or address that clients use to reach "
                            "this station, e.g. --allowed-host inspection-pc.plant.local")
        names.add(clean)
    return frozenset(names)


class TooLarge(HTTPException):
    """Raised from `receive` when a body passes the limit; FastAPI passes an
    HTTPException through its body parsing, so the client gets this 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over the upload limit of {limit / 2**20:g} MB "
                              "(elcell serve --max-upload-mb)")


class Guard:
    """hosts: the names accepted in the Host header (`served_hosts`); None accepts any."""

    def __init__(self, app: ASGIApp, token: str | None = None, max_body: int = 50 * 2**20,
                 hosts: Iterable[str] | None = frozenset(LOOPBACK)):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.hosts = None if hosts is None else frozenset(hosts)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        refused = self._refused_host(headers)
        if refused and scope["type"] == "websocket":  # closed before accepting: the client gets 403
            await send({"type": "websocket.close", "code": 1008, "reason": "host not served (see --allowed-host)"})
        elif refused:
            await _json(send, 400, refused)
        elif scope["type"] == "websocket":
            await self.app(scope, receive, send)
        else:
            await self._http(scope, receive, send, headers)

    async def _http(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, bytes]) -> None:
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

    def _refused_host(self, headers: dict[str, bytes]) -> str | None:
        """Why the request's Host header is refused, or None when it names this station."""
        if self.hosts is None:
            return None
        header = headers.get("host", b"").decode("latin-1")
        if host_name(header) in self.hosts:
            return None
        if not header.strip():
            return ("the request has no Host header, and this station answers only requests naming one of its "
                    "hosts (elcell serve --allowed-host NAME adds one)")
        shown = header.strip()[:100]
        name = host_name(shown)
        if not _NAME.fullmatch(name) or (":" in name and not shown.startswith("[")):  # a port not of digits
            return f"host {shown!r} is not a host name or address (with a port of digits, if any)"
        return (f"host {shown!r} is not a name this station serves: if clients reach it by that name, start "
                f"elcell serve with --allowed-host {name}")

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token)


async def _json(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The token: from --token-file (stripped), --token, or $ELCELL_TOKEN; None for none."""
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"--token-file {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
        if not token:
            raise DataError(f"--token-file {path}: the file is empty; write the token into it")
        return token
    return token or os.environ.get("ELCELL_TOKEN") or None
