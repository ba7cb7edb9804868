"""Safety of the local web app: access token, cross-site request forgery, request size.

- **Token.** On loopback no token is needed; on any other address :func:`check_bind` refuses to start without
  one. With a token, a request must carry it once as ``?token=...`` (it is then kept in an HttpOnly,
  SameSite=Strict cookie) or in that cookie; anything else gets 403.
- **Forgery.** State-changing requests are POSTs that must carry the ``csrf`` form field equal to the
  ``semlens_csrf`` cookie (double-submit; the cookie is SameSite=Strict, so another site can neither read nor
  send it), and an ``Origin`` header, when the browser sends one, must be this server's own.
- **Size.** Request bodies over :data:`MAX_BODY` bytes are refused with 413 before they are read whole.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

__all__ = ["check_bind", "is_loopback", "TokenAndSizeMiddleware", "csrf_token", "check_csrf", "CSRF_COOKIE",
           "TOKEN_COOKIE", "MAX_BODY", "Forbidden"]

CSRF_COOKIE, TOKEN_COOKIE = "semlens_csrf", "semlens_token"
MAX_BODY = 64 * 1024  # bytes: remarks and forms are small

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class Forbidden(PermissionError):
    """A request without a valid forgery token or from another origin."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without an access token (``ValueError`` naming the address)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to serve on {host} without --token: anyone who reaches this address could read "
                         "and change the project. Pass --token SECRET (or bind 127.0.0.1)")
    if token is not None and len(token) < 8:
        raise ValueError("--token must have at least 8 characters")


def csrf_token(request: Request) -> str:
    """This browser's forgery token (from its cookie, or a new one that the response must set)."""
    token = request.cookies.get(CSRF_COOKIE)
    if not token or len(token) != 43:
        token = request.state.__dict__.setdefault("new_csrf", secrets.token_urlsafe(32))
    return token


def check_csrf(request: Request, form_token: str | None) -> None:
    """Raise :class:`Forbidden` unless the form's token equals the cookie's and the origin is this server."""
    cookie = request.cookies.get(CSRF_COOKIE) or ""
    if not cookie or not form_token or not hmac.compare_digest(cookie, form_token):
        raise Forbidden("missing or wrong forgery token: reload the page and submit again")
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise Forbidden(f"request from another origin ({origin}) refused")


class TokenAndSizeMiddleware:
    """ASGI middleware: access token (when configured) and the request body limit."""

    def __init__(self, app: ASGIApp, token: str | None = None, max_body: int = MAX_BODY) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        set_cookie = False
        if self.token is not None:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                await PlainTextResponse("403: this server needs its access token (?token=...)", 403)(
                    scope, receive, send)
                return
            set_cookie = "token" in request.query_params
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await PlainTextResponse(f"413: request body over {self.max_body} bytes", 413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise ValueError(f"request body over {self.max_body} bytes")
            return message

        async def send_with_cookie(message: Any) -> None:
            if set_cookie and message["type"] == "http.response.start":
                cookie = Response()
                cookie.set_cookie(TOKEN_COOKIE, self.token or "", httponly=True, samesite="strict")
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in cookie.raw_headers if k == b"set-cookie"]
            await send(message)

        await self.app(scope, limited_receive, send_with_cookie)
