"""Errors of the HTTP gateway as RFC 9457 problem details (``application/problem+json``).

Every error body has ``type``, ``title``, ``status``, ``detail`` and
``errors``: a list of ``{"field", "description"}`` naming what was wrong
(``tensors.logits``, ``functions[0].params.n_bins``). gRPC statuses map as
follows; field violations come from the backend's google.rpc.BadRequest.

=====================  ====  ===========================================
gRPC code              HTTP  meaning here
=====================  ====  ===========================================
INVALID_ARGUMENT       400   bad tensor, function or parameter
FAILED_PRECONDITION    400
OUT_OF_RANGE           400
NOT_FOUND              404
ALREADY_EXISTS         409
ABORTED                409
RESOURCE_EXHAUSTED     413   message or state over its size limit
  with RetryInfo       503   the replica is overloaded: Retry-After says when
UNAUTHENTICATED        401
PERMISSION_DENIED      403
CANCELLED              499   (client closed request)
UNIMPLEMENTED          501
UNAVAILABLE            503   no backend answered
DEADLINE_EXCEEDED      504   the backend missed request_timeout_seconds
INTERNAL, UNKNOWN,     500   (never with a stack trace)
DATA_LOSS
=====================  ====  ===========================================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "Problem",
    "FieldError",
    "PROBLEM_JSON",
    "problem_from_rpc_error",
    "problem_from_validation",
    "install_problem_handlers",
    "field_path",
]

log = logging.getLogger("lossd.gateway")

PROBLEM_JSON = "application/problem+json"
_TYPE = "urn:lossd:problem:"

# gRPC code -> (HTTP status, problem slug, title)
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid-argument", "Invalid argument"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "failed-precondition", "Failed precondition"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "out-of-range", "Out of range"),
    grpc.StatusCode.NOT_FOUND: (404, "not-found", "Not found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "already-exists", "Already exists"),
    grpc.StatusCode.ABORTED: (409, "aborted", "Aborted"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "resource-exhausted", "Content too large"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated", "Unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission-denied", "Permission denied"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", "Request cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "unimplemented", "Not implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "backend-unavailable", "Backend unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "deadline-exceeded", "Backend deadline exceeded"),
    grpc.StatusCode.INTERNAL: (500, "internal", "Internal error"),
    grpc.StatusCode.UNKNOWN: (500, "internal", "Internal error"),
    grpc.StatusCode.DATA_LOSS: (500, "internal", "Internal error"),
}


@dataclass(frozen=True)
class FieldError:
    """One problem field: the request path and what was wrong there."""

    field: str
    description: str


@dataclass
class Problem(Exception):
    """An error answered as problem details; raise it from any route."""

    status: int
    slug: str
    title: str
    detail: str
    errors: Sequence[FieldError] = field(default_factory=tuple)
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": _TYPE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": [{"field": e.field, "description": e.description} for e in self.errors],
        }
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out

    def response(self, instance: str | None = None) -> JSONResponse:
        # Retry-After in whole seconds (RFC 9110), never 0: the replica's own hint when it gave one.
        retry_after = math.ceil(self.extra.get("retry_after_seconds", 1.0))
        headers = {"Retry-After": str(max(1, retry_after))} if self.status == 503 else None
        return JSONResponse(self.body(instance), status_code=self.status, media_type=PROBLEM_JSON, headers=headers)

    @classmethod
    def bad_field(cls, field_: str, description: str) -> Problem:
        """Make a 400 naming one field of the request body."""
        return cls(400, "invalid-argument", "Invalid argument", f"{field_}: {description}", (FieldError(field_, description),))


def problem_from_rpc_error(error: grpc.RpcError) -> Problem:
    """Map a failed backend call to a problem, with BadRequest field violations as ``errors``."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    status, slug, title = _GRPC_TO_HTTP.get(code, (500, "internal", "Internal error"))
    details = error.details() if callable(getattr(error, "details", None)) else ""
    errors: list[FieldError] = []
    extra: dict[str, Any] = {"grpc_code": code.name}
    try:
        rich = rpc_status.from_call(error)
    except ValueError:  # details that disagree with the status: keep the status, drop the details
        rich = None
    retry: error_details_pb2.RetryInfo | None = None
    if rich is not None:
        for detail in rich.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                errors.extend(FieldError(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry is not None:
        # Overloaded, not too large: the same request may succeed later (413 would tell the caller never to resend it).
        status, slug, title = 503, "overloaded", "Server overloaded"
        extra["retry_after_seconds"] = retry.retry_delay.ToNanoseconds() / 1e9
    elif status == 503:
        details = f"no lossd backend answered ({details})" if details else "no lossd backend answered"
    return Problem(status, slug, title, details or title, tuple(errors), extra)


def field_path(loc: Sequence[str | int]) -> str:
    """Pydantic's error location as a body path: ("body", "tensors", "x", "shape", 0) -> "tensors.x.shape[0]"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in _UNION_TAGS:
            continue  # pydantic names the union member it tried; the client's body has no such key
        else:
            out += f".{p}" if out else str(p)
    return out or "body"


# Union members named in pydantic error locations for the models of this gateway.
_UNION_TAGS = {"str", "FunctionSpecBody", "list[...]", "float", "int", "bool", "none"}


def problem_from_validation(exc: RequestValidationError) -> Problem:
    """A 400 problem naming every invalid field of a request FastAPI refused."""
    found: dict[tuple[str, str], FieldError] = {}
    for e in exc.errors():
        path, description = field_path(e.get("loc", ())), str(e.get("msg", "invalid value"))
        if e.get("type") == "json_invalid":  # its location is a character offset, not a field
            path, description = "body", f"expected a JSON object: {e.get('ctx', {}).get('error', description)}"
        found.setdefault((path, description), FieldError(path, description))
    # A union ("name" or {spec}) reports every member it tried: when a deeper field of the same
    # value failed, the shallower "should be a valid string" says nothing more.
    paths = {f.field for f in found.values()}
    errors = [f for f in found.values() if not any(p.startswith((f.field + ".", f.field + "[")) for p in paths)]
    detail = "; ".join(f"{e.field}: {e.description}" for e in errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    # A body that does not match the schema is a bad request like any other: 400 with the fields.
    return Problem(400, "validation-error", "Request body failed validation", detail, tuple(errors))


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` with problem details."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response(request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_from_validation(exc).response(request.url.path)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed", 413: "content-too-large"}.get(exc.status_code, "http-error")
        title = {404: "Not found", 405: "Method not allowed", 413: "Content too large"}.get(exc.status_code, "HTTP error")
        return Problem(exc.status_code, slug, title, str(exc.detail)).response(request.url.path)

    async def on_rpc(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, grpc.RpcError)
        return problem_from_rpc_error(exc).response(request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return Problem(500, "internal", "Internal error", "internal error; the gateway log has the details").response(request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(grpc.RpcError, on_rpc)
    app.add_exception_handler(Exception, on_unexpected)
