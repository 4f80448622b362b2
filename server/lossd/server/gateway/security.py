"""HTTP hardening of the gateway: bearer tokens, JSON-only bodies and security headers on every response.

Three ASGI middlewares, outermost first in :func:`install_security`:

- :class:`SecurityHeadersMiddleware`: ``Content-Security-Policy`` ('self'
  only: the dashboard and /docs load nothing from elsewhere), ``X-Frame-Options``,
  ``X-Content-Type-Options``, ``Referrer-Policy``, and ``Cache-Control: no-store``
  on responses that set no caching of their own (assets are revalidated instead);
- :class:`BearerAuthMiddleware`: 401 problem details with ``WWW-Authenticate``
  unless the path is open (health, the docs, static assets; /metrics,
  /dashboard and /v1/history only with ``metrics_public``);
- :class:`JsonOnlyMiddleware`: 415 for a POST/PUT/PATCH whose ``Content-Type``
  is not ``application/json``, so that no web page can send one cross-origin
  without a CORS preflight.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lossd.server.gateway.problems import Problem
from lossd.server.security import WWW_AUTHENTICATE, Authenticator, Unauthenticated

__all__ = [
    "BearerAuthMiddleware",
    "JsonOnlyMiddleware",
    "SecurityHeadersMiddleware",
    "CONTENT_SECURITY_POLICY",
    "open_paths",
    "ASSET_PREFIXES",
]

# data: images: the dashboard's favicon and Swagger UI's icons are inline SVG data URIs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
ASSET_PREFIXES = ("/static/", "/docs/assets/")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
_DOC_PATHS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect"})
_MONITORING_PATHS = frozenset({"/metrics", "/dashboard", "/v1/history", "/"})


def open_paths(metrics_public: bool) -> frozenset[str]:
    """Paths served without a token: health and the docs (the published contract), plus monitoring when public."""
    return _HEALTH_PATHS | _DOC_PATHS | (_MONITORING_PATHS if metrics_public else frozenset())


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_asset = str(scope["path"]).startswith(ASSET_PREFIXES)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-cache" if is_asset else "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BearerAuthMiddleware:
    """401 for requests without a valid ``Authorization: Bearer`` token, except on open paths and assets."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator, open_paths: frozenset[str]) -> None:
        self.app = app
        self.authenticator = authenticator
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or path in self.open_paths or path.startswith(ASSET_PREFIXES):
            await self.app(scope, receive, send)
            return
        try:
            caller = self.authenticator.authenticate(Headers(scope=scope).getlist("authorization"), "http")
        except Unauthenticated as exc:
            response = Problem(401, "unauthenticated", "Unauthenticated", exc.detail).response(path)
            error = ', error="invalid_token"' if exc.reason != "missing" else ""  # RFC 6750 section 3
            response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE + error
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


class JsonOnlyMiddleware:
    """415 problem details for a body-carrying request that is not ``application/json``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS:
            content_type = Headers(scope=scope).get("content-type", "")
            media_type = content_type.split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                got = f"'{content_type}'" if content_type else "none"
                problem = Problem(
                    415, "unsupported-media-type", "Unsupported media type", f"expected Content-Type: application/json, got {got}"
                )
                await problem.response(str(scope["path"]))(scope, receive, send)
                return
        await self.app(scope, receive, send)
