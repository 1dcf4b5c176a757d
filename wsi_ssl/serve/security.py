"""What makes ``wsi-ssl serve`` safe to leave running: one ASGI middleware in front of the app.

Every request passes :class:`Guard`, which, before the application sees it:

* answers 400 to a ``Host`` header not in the allow-list (loopback names by default), so a
  DNS-rebinding page cannot read the archive through the user's browser;
* answers 401 without the access token when one is set (``Authorization: Bearer TOKEN``, the
  scheme in any case, or the ``wsi_ssl_token`` cookie that ``/?token=TOKEN`` sets for the page);
* answers 415 to a POST that is not ``application/json`` (a ``text/plain`` POST is a CORS
  "simple" request any web page can send) and 413 to a body over ``max_body`` bytes, counted
  as it arrives (a claimed ``Content-Length`` over the cap is refused unread); the upload
  paths (``upload_paths``) take only ``upload_types`` (pictures; never a "simple" type) and
  bodies up to ``max_upload`` bytes, checked the same way;
* adds a Content-Security-Policy (scripts, styles, pictures and requests from this server
  only) and the usual hardening headers to every answer.

No answer repeats what the client sent.
"""

from __future__ import annotations

import hmac
import json
import re
import string
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from wsi_ssl.errors import ConfigError

__all__ = ["LOOPBACK_HOSTS", "Guard", "GuardConfig", "check_token", "redact_paths"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_JSON_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 16 << 20
UPLOAD_TYPES = ("image/png", "image/jpeg", "image/tiff")
TOKEN_COOKIE = "wsi_ssl_token"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
_PART = r"[^\\/\s'\"<>|:;,()\[\]]+"
_PATH = re.compile(rf"(?:[A-Za-z]:|{_PART})?(?:[\\/]{_PART}){{2,}}[\\/]?")


def redact_paths(text: str) -> str:
    """``text`` with each filesystem path of three components or more (absolute, or relative
    as a server started on ``data/archive`` names its stores) cut to its last component;
    ``µm/px`` and the like are left alone."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], text)


@dataclass(frozen=True)
class GuardConfig:
    """The limits :class:`Guard` enforces.

    Args:
        allowed_hosts: ``Host`` names (without port) that are served; ``"*"`` allows any.
        token: the access token every request must carry; None serves without one.
        max_body: the largest JSON request body in bytes.
        upload_paths: paths whose POST body is a picture, not JSON.
        upload_types: the content types those take.
        max_upload: the largest picture body in bytes.
    """

    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    token: str | None = None
    max_body: int = MAX_JSON_BYTES
    upload_paths: tuple[str, ...] = ()
    upload_types: tuple[str, ...] = UPLOAD_TYPES
    max_upload: int = MAX_UPLOAD_BYTES

    def __post_init__(self) -> None:
        check_token(self.token)

    def limits(self, path: str) -> tuple[tuple[str, ...], int]:
        """The content types and the body cap of a POST to ``path``."""
        if path in self.upload_paths:
            return self.upload_types, self.max_upload
        return ("application/json",), self.max_body


TOKEN_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~")
"""What a token may hold: it travels in a URL, a cookie and a header unchanged."""


def check_token(token: str | None) -> None:
    """Refuse a token shorter than 8 characters or with characters a URL or cookie would
    change (``secrets.token_urlsafe()`` gives a good one).

    Raises:
        ConfigError: naming the rule.
    """
    if token is None:
        return
    if len(token) < 8 or not set(token) <= TOKEN_CHARACTERS:
        raise ConfigError(
            "the token must be at least 8 characters of letters, digits and - . _ ~ (it goes in "
            "a URL and a cookie); python -c 'import secrets; print(secrets.token_urlsafe())' "
            "makes one",
            parameters=("token",),
        )


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8765
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _bearer(authorization: str) -> str:
    """The token of an ``Authorization`` header: what follows the ``Bearer`` scheme, named in
    any case (RFC 7235: ``bearer`` and ``BEARER`` are the same scheme); any other header is
    taken whole (a bare token passes; another scheme's credentials are a wrong token)."""
    header = authorization.strip()
    scheme, _, credentials = header.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else header


def _cookies(scope: Scope) -> dict[str, str]:
    out = {}
    for part in _header(scope, b"cookie").split(";"):
        name, _, value = part.strip().partition("=")
        out[name] = value
    return out


async def _answer(send: Send, status: int, error: str, extra: Iterable[tuple[bytes, bytes]] = ()):
    body = json.dumps({"error": error, "type": "RequestRefused"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *HEADERS,
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app = app
        self.config = config
        self.hosts = {h.lower() for h in config.allowed_hosts}

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        """Why ``scope`` is refused (status, message), or None."""
        if "*" not in self.hosts and _host_name(_header(scope, b"host")) not in self.hosts:
            return 400, "this server answers only to its own host names (see --allow-host)"
        if self.config.token is not None and not self._authorised(scope):
            return 401, "this server needs its access token: open the URL it printed"
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            types, cap = self.config.limits(scope.get("path", ""))
            ctype = _header(scope, b"content-type").split(";")[0].strip().lower()
            if ctype not in types:
                return 415, f"requests with a body must be {' or '.join(types)}"
            length = _header(scope, b"content-length")
            if length and (not length.isdigit() or int(length) > cap):
                return 413, f"request bodies are limited to {cap} bytes"
        return None

    def _authorised(self, scope: Scope) -> bool:
        token = self.config.token or ""
        given = _bearer(_header(scope, b"authorization"))
        given = given or _cookies(scope).get(TOKEN_COOKIE, "")
        if not given and scope.get("path") == "/":
            query = scope.get("query_string", b"").decode("latin-1")
            given = dict(p.partition("=")[::2] for p in query.split("&")).get("token", "")
        return hmac.compare_digest(given.encode(), token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _answer(send, *refusal)
            return
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            cap = self.config.limits(scope.get("path", ""))[1]
            body = await self._read_body(receive, cap)
            if body is None:
                await _answer(send, 413, f"request bodies are limited to {cap} bytes")
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, self._with_headers(scope, send))

    async def _read_body(self, receive: Receive, cap: int) -> bytes | None:
        """The whole body, or None as soon as it passes ``cap`` (the rest is not read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _with_headers(self, scope: Scope, send: Send) -> Send:
        cookie: list[tuple[bytes, bytes]] = []
        if self.config.token is not None and scope.get("path") == "/":
            value = f"{TOKEN_COOKIE}={self.config.token}; HttpOnly; SameSite=Strict; Path=/"
            cookie = [(b"set-cookie", value.encode())]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS, *cookie]
            await send(message)

        return send_with_headers


def _replay(body: bytes, original: Receive) -> Receive:
    """A ``receive`` that gives the body read once, then waits on the client as before."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await original()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
