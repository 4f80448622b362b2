"""The HTTP gateway: JSON in front of the lossd gRPC service, /metrics and the dashboard.

``create_app(settings, backends=[...], monitoring=...)`` returns a FastAPI app.
In ``lossd serve`` it shares the process (and the :class:`Monitoring`) with the
gRPC server; alone, it forwards to one or more replicas with round-robin and
failover (:mod:`lossd.server.gateway.backends`) and exports its own HTTP
metrics. Routes:

- ``POST /v1/evaluate``: tensors (nested lists or base64), function specs, tags
  -> ``{"results", "diagnostics"}`` as ``lossd eval --json`` prints them;
- ``GET /v1/functions``: the catalogue; ``GET /v1/history``: the dashboard's data;
- ``GET /healthz`` (the process is up), ``GET /readyz`` (a backend answers its
  health check), ``GET /metrics``, ``GET /dashboard``, ``GET /docs``.

Errors are problem details (:mod:`lossd.server.gateway.problems`). Tokens,
JSON-only bodies, CORS and security headers: :mod:`lossd.server.gateway.security`;
the caller's ``Authorization`` header is forwarded to the backend.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lossd.client.results import catalogue_to_json, response_to_json
from lossd.server.gateway.backends import BackendPool
from lossd.server.gateway.dashboard import install_dashboard
from lossd.server.gateway.docs import install_docs
from lossd.server.gateway.models import EvaluateBody, request_to_proto
from lossd.server.gateway.problems import PROBLEM_JSON, FieldError, Problem, install_problem_handlers
from lossd.server.gateway.security import BearerAuthMiddleware, JsonOnlyMiddleware, SecurityHeadersMiddleware, open_paths
from lossd.server.monitoring import Monitoring
from lossd.server.observability.logging import annotate_gateway_request
from lossd.server.security import Authenticator
from lossd.server.settings import Settings
from lossd.v1 import lossd_pb2 as pb

__all__ = ["create_app"]

T = TypeVar("T")

_PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {PROBLEM_JSON: {}}}
    for code, text in {
        400: "invalid JSON body, tensors, functions or parameters; `errors` names each field",
        401: "no valid `Authorization: Bearer <token>` header (when the server has tokens)",
        413: "request body or message over its size limit",
        503: "no backend answered, or the replica is overloaded (`Retry-After`: when to resend)",
        504: "the backend missed the deadline",
    }.items()
}


def _forwarded(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's credentials as gRPC metadata for the backend call."""
    value = request.headers.get("authorization")
    return (("authorization", value),) if value is not None else ()


def create_app(
    settings: Settings,
    *,
    backends: Sequence[str],
    monitoring: Monitoring | None = None,
    authenticator: Authenticator | None = None,
) -> FastAPI:
    """Build the gateway app forwarding to the gRPC ``backends`` (host:port or unix:path).

    ``authenticator`` (default: one for ``settings.auth_tokens_file`` on the
    monitoring registry) checks every request's bearer token.
    """
    pool = BackendPool(backends, settings)
    monitoring = monitoring if monitoring is not None else Monitoring(settings)
    if authenticator is None:
        authenticator = Authenticator.from_settings(settings, monitoring.registry)

    parser = BodyParser()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await pool.close()
        parser.close()

    app = FastAPI(
        title="lossd gateway",
        version="1",
        summary="Loss, metric and calibration evaluation over HTTP/JSON, in front of the lossd gRPC service.",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs from local assets
        redoc_url=None,
    )
    app.state.pool = pool
    app.state.monitoring = monitoring
    install_problem_handlers(app)

    async def evaluate(body: EvaluateBody, http: Request) -> JSONResponse:
        """Evaluate functions on tensors; answers what `lossd eval --json` prints: {"results", "diagnostics"}."""
        raise AssertionError("unreachable: the route's handler parses the body and calls forward()")  # pragma: no cover

    async def forward(request: pb.EvaluateRequest, http: Request) -> JSONResponse:
        metadata = annotate_gateway_request(http.scope, request, _forwarded(http))  # request id, log fields, traceparent
        response: pb.EvaluateResponse = await pool.call(lambda stub, timeout: stub.Evaluate(request, timeout=timeout, metadata=metadata))
        return JSONResponse(await _off_the_loop(response.ByteSize(), response_to_json, response))

    app.router.add_api_route(
        "/v1/evaluate",
        evaluate,
        methods=["POST"],
        responses=_PROBLEM_RESPONSES,
        tags=["evaluate"],
        route_class_override=_evaluate_route(parser, forward),
    )

    @app.get("/v1/functions", responses=_PROBLEM_RESPONSES, tags=["evaluate"])
    async def functions(
        http: Request,
        family: str = Query("", description="only this family (regression, classification, calibration...)"),
    ) -> JSONResponse:
        """List the catalogue: every function with its roles, parameters, outputs and reference."""
        request, metadata = pb.ListFunctionsRequest(family=family), _forwarded(http)
        response = await pool.call(lambda stub, timeout: stub.ListFunctions(request, timeout=timeout, metadata=metadata))
        return JSONResponse(catalogue_to_json(response))

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses=_PROBLEM_RESPONSES, tags=["operations"])
    async def readyz() -> JSONResponse:
        """Readiness: at least one gRPC backend answers its grpc.health.v1 check with SERVING."""
        statuses = await pool.check()
        if "SERVING" not in statuses.values():
            raise Problem(503, "backend-unavailable", "Backend unavailable", "no gRPC backend is SERVING", extra={"backends": statuses})
        return JSONResponse({"status": "ready", "backends": statuses})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text exposition of this process's registry."""
        return Response(await monitoring.exposition(), media_type=CONTENT_TYPE_LATEST)  # rendered off the event loop

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    install_dashboard(app, monitoring)
    install_docs(app, bearer=authenticator is not None)
    # Starlette runs the last added outermost: headers on every answer, CORS preflights
    # before auth, every request counted, a token checked before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(JsonOnlyMiddleware)
    if authenticator is not None:
        app.add_middleware(BearerAuthMiddleware, authenticator=authenticator, open_paths=open_paths(settings.metrics_public))
    app.add_middleware(HttpMetricsMiddleware, monitoring=monitoring)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(SecurityHeadersMiddleware)
    return app


# Bodies this large are parsed and validated in a worker process, responses this large
# rendered on a thread: a 38 MiB nested-list body parsed on the event loop stalled every
# other call for seconds, and a thread would not do (the parsers hold the GIL throughout).
LARGE_BODY_BYTES = 1 << 20


async def _off_the_loop(nbytes: int, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args) if nbytes >= LARGE_BODY_BYTES else fn(*args)


def _parse_evaluate(raw: bytes) -> pb.EvaluateRequest:
    try:
        body = EvaluateBody.model_validate_json(raw)
    except ValidationError as exc:  # the errors FastAPI would have raised, located in the body
        errors = [
            {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"], "ctx": {k: str(v) for k, v in e.get("ctx", {}).items()}}
            for e in exc.errors()
        ]
        raise RequestValidationError(errors) from None
    return request_to_proto(body)


def _parse_in_worker(raw: bytes) -> tuple[str, Any]:
    """_parse_evaluate in the parser process; its answer as plain (picklable) values."""
    try:
        return "ok", _parse_evaluate(raw).SerializeToString()
    except RequestValidationError as exc:
        return "invalid", list(exc.errors())
    except Problem as exc:
        return "problem", (exc.status, exc.slug, exc.title, exc.detail, [(e.field, e.description) for e in exc.errors], exc.extra)


class BodyParser:
    """Parses /v1/evaluate bodies: small ones inline, large ones in one worker process started on first use."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def parse(self, raw: bytes) -> pb.EvaluateRequest:
        if len(raw) < LARGE_BODY_BYTES:
            return _parse_evaluate(raw)
        if self._pool is None:  # spawn, not fork: this process runs gRPC threads
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        kind, value = await asyncio.get_running_loop().run_in_executor(self._pool, _parse_in_worker, raw)
        if kind == "invalid":
            raise RequestValidationError(value)
        if kind == "problem":
            status, slug, title, detail, errors, extra = value
            raise Problem(status, slug, title, detail, tuple(FieldError(f, d) for f, d in errors), extra)
        request: pb.EvaluateRequest = pb.EvaluateRequest.FromString(value)
        return request

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _evaluate_route(parser: BodyParser, forward: Callable[[pb.EvaluateRequest, Request], Awaitable[Response]]) -> type[APIRoute]:
    """The /v1/evaluate route: documented from EvaluateBody as usual, parsed off the event loop when large."""

    class ParsedOffTheLoop(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            async def handler(http: Request) -> Response:
                return await forward(await parser.parse(await http.body()), http)

            return handler

    return ParsedOffTheLoop


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``: by Content-Length up front, then by the bytes actually sent.

    The body is buffered here (FastAPI would buffer it anyway to parse the
    JSON), so an oversize body never reaches the route.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> Response:
        problem = Problem(
            413,
            "content-too-large",
            "Content too large",
            f"request body of {size} exceeds the limit of {self.max_bytes} bytes (max_body_bytes)",
        )
        response: Response = problem.response()
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(f"{int(length)} bytes")(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(f"more than {self.max_bytes} bytes")(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetricsMiddleware:
    """Counts and times gateway requests by route template (never by raw path: bounded cardinality)."""

    def __init__(self, app: ASGIApp, *, monitoring: Monitoring) -> None:
        self.app = app
        self.monitoring = monitoring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            handler = getattr(scope.get("route"), "path", None) or "other"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            m = self.monitoring
            m.http_requests.labels(handler, method, str(status)).inc()
            m.http_duration.labels(handler, method).observe(time.perf_counter() - start)
