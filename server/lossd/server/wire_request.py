"""EvaluateRequest parsed without copying its tensors' bytes: ``Tensor.data`` read as views into the received message.

gRPC hands the servicer each request as one Python ``bytes`` object. Parsed
the generated way, a request's tensor bytes are copied twice more: upb copies
every ``bytes`` field into the message's arena, and each read of
``Tensor.data`` is a fresh ``bytes`` copy of that. For a 262 MB request that
is 524 MB more memory and two memcpys before any kernel runs.

:func:`parse_evaluate_request` instead scans the wire format of the request's
``tensors`` map (field 1; in each entry the key, 1, and the Tensor, 2; in each
Tensor its ``data``, 3), parses the message with every ``data`` field left
out (only the small rest is copied), and keeps a read-only ``memoryview`` of
each tensor's data in the received bytes. The views travel in a context
variable: the deserializer runs in the call's task, and the admission copies
the task's context into the compute thread, so
:func:`lossd.server.convert.decode_request_tensors` finds them for exactly the
``tensors`` map it is given, and reads ``t.data`` (the generated way) for any
other. They are handed over once (:func:`take_tensor_data_views`), and the
call lets go of views it never took when it ends (:func:`release_tensor_data`):
asyncio copies the current context into every callback and timer it
schedules, and a cancelled timer keeps its copy until its deadline. Before,
each message of a stream scheduled the 300 s idle timeout of the next read
with the previous message's views in its context: after eight 32 MiB parts of a
[512, 128256] batch, the finished stream's bytes were still resident (up to
four payloads over the server's idle RSS in back-to-back calls).

Protobuf's rules are kept: the last occurrence of a field wins, a map entry
replaces an earlier one with the same key, and bytes that do not scan cleanly
are parsed the generated way (which raises its usual DecodeError).

Bytes that do not parse at all (bad UTF-8 in a string, a corrupt wire
format) would have gRPC answer UNKNOWN from its deserializer. Every
LossService method is registered (:func:`add_loss_service`) with a lenient
deserializer instead: it hands the handler an empty message and notes the
error in the call's context (the deserializer runs in the call's task), and
:func:`lossd.server.errors.rpc_errors` answers INVALID_ARGUMENT with it
(:func:`undecodable`). It is part of the registration, not an interceptor:
nothing is built per call.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc

__all__ = [
    "parse_evaluate_request",
    "take_tensor_data_views",
    "release_tensor_data",
    "received_bytes",
    "add_loss_service",
    "lenient",
    "undecodable",
    "NESTING_FIELD",
]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_TENSORS, _ENTRY_KEY, _ENTRY_VALUE, _TENSOR_DATA = 1, 1, 2, 3
_ZERO_COPY_METHODS = ("Evaluate", "EvaluateStream")
# Below this the copies cost less than the scan: the scan is Python (about 30 µs for a [64, 10] request,
# against 0.7 µs for the generated parse), the copies of 64 KiB a few µs.
ZERO_COPY_MIN_BYTES = 64 * 1024


class _Malformed(Exception):
    """Bytes this scanner does not follow: parse them the generated way."""


@dataclass
class _WireData:
    tensors: Any  # the request's ``tensors`` map container (upb returns this same object while it lives)
    views: dict[str, memoryview] | None  # None once taken (or released): the decoded tensors then hold the bytes
    size: int  # bytes received: the request's ByteSize() had its data been parsed into it


_latest: contextvars.ContextVar[_WireData | None] = contextvars.ContextVar("lossd_wire_data", default=None)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: memoryview, pos: int, end: int) -> Any:
    """(field number, wire type, start of the field, start of its payload, end) of each field in buf[pos:end]."""
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed
        if wire == _VARINT:
            _, after = _varint(buf, pos, end)
        elif wire == _I64:
            after = pos + 8
        elif wire == _I32:
            after = pos + 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        else:  # groups: EvaluateRequest has none
            raise _Malformed
        if after > end:
            raise _Malformed
        yield number, wire, start, pos, after
        pos = after


def _length_delimited(number: int, body: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(body)) + body


def _entry(buf: memoryview, pos: int, end: int) -> tuple[str, memoryview, bytes]:
    """One ``tensors`` entry: its key, its tensor's data (a view), and the entry re-encoded without the data."""
    key = b""
    data = buf[0:0]
    kept = bytearray()
    for number, wire, start, body, after in _fields(buf, pos, end):
        if number == _ENTRY_VALUE and wire == _LEN:  # a Tensor (occurrences merge: the last data wins)
            tensor = bytearray()
            for t_number, t_wire, t_start, t_body, t_after in _fields(buf, body, after):
                if t_number == _TENSOR_DATA and t_wire == _LEN:
                    data = buf[t_body:t_after]
                else:
                    tensor += buf[t_start:t_after]
            kept += _length_delimited(_ENTRY_VALUE, bytes(tensor))
        elif number == _ENTRY_KEY and wire == _LEN:
            key = bytes(buf[body:after])
            kept += buf[start:after]
        else:  # upb keeps an entry with any other field out of the map (as an unknown field): leave it to upb
            raise _Malformed
    try:
        return key.decode("utf-8"), data, bytes(kept)
    except UnicodeDecodeError:
        raise _Malformed from None


def _strip(raw: bytes) -> tuple[bytes, dict[str, memoryview]]:
    buf = memoryview(raw)
    stripped = bytearray()
    views: dict[str, memoryview] = {}
    for number, wire, start, body, after in _fields(buf, 0, len(buf)):
        if number == _TENSORS and wire == _LEN:
            key, data, entry = _entry(buf, body, after)
            views[key] = data  # a later entry with the same key replaces the earlier one, as in a parsed map
            stripped += _length_delimited(_TENSORS, entry)
        else:
            stripped += buf[start:after]
    return bytes(stripped), views


def parse_evaluate_request(raw: bytes) -> pb.EvaluateRequest:
    """The request ``raw`` encodes, its tensors' data left in ``raw`` (see :func:`take_tensor_data_views`) when it is large."""
    if len(raw) < ZERO_COPY_MIN_BYTES:
        _latest.set(None)
        small: pb.EvaluateRequest = pb.EvaluateRequest.FromString(raw)
        return small
    try:
        stripped, views = _strip(raw)
    except _Malformed:
        _latest.set(None)
        parsed: pb.EvaluateRequest = pb.EvaluateRequest.FromString(raw)  # raises the DecodeError errors.py turns into INVALID_ARGUMENT
        return parsed
    request: pb.EvaluateRequest = pb.EvaluateRequest.FromString(stripped)
    _latest.set(_WireData(request.tensors, views, len(raw)))
    return request


# The error of the call's request bytes that did not parse: (field, description), noted by lenient().
_undecodable: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("lossd_undecodable", default=None)
# protobuf refuses messages nested deeper than 100 levels. In lossd.v1 only a function's params (a
# google.protobuf.Struct: three levels per JSON object or list) nest, so that is what nests too deep.
NESTING_FIELD = "functions.params"
_TOO_DEEP = "MaxDepth"


def _undecodable_reason(message_type: type[Any], exc: DecodeError) -> str:
    if _TOO_DEEP in str(exc):
        return "expected JSON parameters nested at most about 30 levels deep (protobuf parses 100 message levels), got deeper"
    return f"expected a serialized {message_type.DESCRIPTOR.full_name}, got bytes that do not parse ({exc})"


def lenient(deserialize: Callable[[bytes], Any], message_type: type[Any]) -> Callable[[bytes], Any]:
    """``deserialize``, answering an empty ``message_type`` (the error noted for :func:`undecodable`) for bytes that do not parse."""

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            _undecodable.set((NESTING_FIELD if _TOO_DEEP in str(exc) else "request", _undecodable_reason(message_type, exc)))
            return message_type()

    return parse


def undecodable() -> tuple[str, str] | None:
    """(field, description) of this call's request bytes that did not parse; None when they all did."""
    return _undecodable.get()


def take_tensor_data_views(tensors: Mapping[str, pb.Tensor]) -> dict[str, memoryview] | None:
    """The data views of ``tensors`` when it is the map of the request last parsed in this context, else None; handed over once.

    A second take of the same map is a lossd bug (its data fields are empty): RuntimeError."""
    latest = _latest.get()
    if latest is None or latest.tensors is not tensors:
        return None
    views, latest.views = latest.views, None
    if views is None:
        raise RuntimeError("the tensors' data of this request were already taken: a request is decoded once")
    return views


def release_tensor_data() -> None:
    """Let go of the views of this context's last parsed request (the call is over): context copies made before keep none of them."""
    latest = _latest.get()
    if latest is not None:
        latest.views = None


def received_bytes(message: Any) -> int:
    """The size of ``message`` as received: ``ByteSize()``, counting the data left in the received bytes."""
    latest = _latest.get()
    if latest is not None and isinstance(message, pb.EvaluateRequest) and latest.tensors is message.tensors:
        return latest.size
    size: int = message.ByteSize()
    return size


class _Capture:
    """Stands in for the server while the generated code builds its method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def add_loss_service(servicer: pb_grpc.LossServiceServicer, server: grpc.aio.Server) -> None:
    """``add_LossServiceServicer_to_server``, Evaluate's and EvaluateStream's requests parsed by :func:`parse_evaluate_request`, every method's by :func:`lenient`."""
    capture = _Capture()
    pb_grpc.add_LossServiceServicer_to_server(servicer, capture)  # type: ignore[no-untyped-call]  # generated, untyped
    descriptor = pb.DESCRIPTOR.services_by_name["LossService"]
    handlers = {}
    for name, handler in capture.handlers.items():
        message_type = message_factory.GetMessageClass(descriptor.methods_by_name[name].input_type)
        deserialize = parse_evaluate_request if name in _ZERO_COPY_METHODS else handler.request_deserializer
        handlers[name] = handler._replace(request_deserializer=lenient(deserialize, message_type))
    service = descriptor.full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
