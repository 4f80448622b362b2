"""Proto <-> lossd.kernels conversion: the only translation layer of the servicer."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format, struct_pb2

from lossd.client.codec import dtype_name

# One encoding of states, diagnostics and responses: compute="local" answers what the server would.
from lossd.client.local import SEVERITY, evaluation_to_response, state_to_proto
from lossd.kernels import CODES, Evaluation, FunctionDef, FunctionSpec, State, get_function
from lossd.kernels.errors import InvalidInput
from lossd.kernels.params import resolve_params
from lossd.kernels.state import check_state
from lossd.server.shared_memory import ONLY_EVALUATE_MESSAGE, shared_tensor
from lossd.server.wire_dtypes import check_bool_bytes, check_wire_shape, tensor_over, wire_dtype
from lossd.server.wire_request import take_tensor_data_views
from lossd.v1 import lossd_pb2 as pb

__all__ = [
    "decode_request_tensors",
    "specs_from_request",
    "state_from_proto",
    "state_to_proto",
    "evaluation_to_proto",
    "function_info",
    "list_functions_response",
]


MAX_PARAMS_JSON_BYTES = 64 * 1024
# json.loads recurses once per level: "[" * 5000 reaches Python's recursion limit, where a garbage
# collection that finalizes async generators fails in their hooks (stderr noise, "Exception ignored").
MAX_PARAMS_JSON_NESTING = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def nested_deeper_than(text: str, levels: int) -> bool:
    """Whether ``[`` and ``{`` nest more than ``levels`` deep in ``text`` (outside strings), found without recursing.

    The brackets are counted first: a few keys never open ``levels`` of them,
    and the scan (0.2 ms a call) is left for the text that might."""
    if text.count("[") + text.count("{") <= levels:
        return False
    marks = np.frombuffer(_JSON_STRING.sub("", text).encode(), dtype=np.uint8)
    steps = np.isin(marks, (ord("["), ord("{"))).astype(np.int64) - np.isin(marks, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0)) > levels


def _wire_array(t: pb.Tensor, field: str, data: memoryview | None = None) -> tuple[np.ndarray, torch.dtype]:
    """A read-only numpy view of a wire tensor's bytes (bfloat16 as uint16), after checking dtype, shape and length.

    ``data``: the tensor's bytes as a view into the received message (lossd.server.wire_request);
    without it ``t.data`` is read, once: each read of a protobuf bytes field is a fresh copy of it."""
    if t.HasField("shared_memory"):  # Evaluate's tensors under allow_shared_memory are mapped before they get here
        raise InvalidInput.single(f"{field}.shared_memory", ONLY_EVALUATE_MESSAGE)
    shape = tuple(t.shape)  # once: each read of a repeated field builds a new container
    check_wire_shape(shape, field)
    numpy_dtype, torch_dtype = wire_dtype(t, field)
    if data is None:
        data = memoryview(t.data)
    expected = math.prod(shape) * numpy_dtype.itemsize
    if len(data) != expected:
        raise InvalidInput.single(
            field,
            f"byte length {len(data)} does not match dtype {dtype_name(t.dtype)} × shape {list(shape)} (expected {expected} bytes)",
        )
    array = np.frombuffer(data, dtype=numpy_dtype).reshape(shape)
    check_bool_bytes(array, field)
    return array, torch_dtype


def _to_torch(t: pb.Tensor, field: str, data: memoryview | None) -> torch.Tensor:
    """A wire tensor as a torch tensor over the message's bytes: no copy, bfloat16 included."""
    return tensor_over(*_wire_array(t, field, data))


def decode_request_tensors(
    tensors: Mapping[str, pb.Tensor], device: torch.device, *, allow_shared_memory: bool | None = None
) -> dict[str, torch.Tensor]:
    """Wire tensors -> torch tensors on ``device`` (zero-copy on the CPU: views into the received message's bytes).

    ``allow_shared_memory``: the server's setting, for Evaluate's tensors; None
    where shared memory is not taken at all (a stream's messages), whatever the setting."""
    views = take_tensor_data_views(tensors) or {}
    out = {}
    for name, t in tensors.items():
        if not name:
            raise InvalidInput.single("tensors", "expected tensor names, got an empty name")
        if t.HasField("shared_memory") and allow_shared_memory is not None:  # the client's segment, mapped read-only
            tensor = shared_tensor(t, f"tensors.{name}", allowed=allow_shared_memory, data=views.get(name))
        else:
            tensor = _to_torch(t, f"tensors.{name}", views.get(name))
        out[name] = tensor.to(device, non_blocking=True) if device.type != "cpu" else tensor
    return out


def _python_value(v: struct_pb2.Value, path: str) -> Any:
    """A JSON value of a protobuf Value; a non-finite number is refused here, where its path is known.

    (json_format would raise on NaN/Infinity, which JSON cannot spell.)"""
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(v.number_value):
            raise InvalidInput.single(path, f"expected a finite number, got {v.number_value!r}")
        return v.number_value
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "null_value":
        return None
    if kind == "list_value":
        return [_python_value(item, f"{path}[{i}]") for i, item in enumerate(v.list_value.values)]
    if kind == "struct_value":
        return {k: _python_value(item, f"{path}.{k}") for k, item in v.struct_value.fields.items()}
    raise InvalidInput.single(path, "expected a JSON value, got an empty google.protobuf.Value")


def specs_from_request(functions: list[pb.FunctionSpec]) -> list[FunctionSpec]:
    """Wire function specs -> kernel specs (validated later by lossd.kernels.evaluate.prepare)."""
    specs = []
    for i, f in enumerate(functions):
        if not f.name:
            raise InvalidInput.single(f"functions[{i}].name", "expected a function name, got an empty string")
        params = {k: _python_value(v, f"functions[{i}].params.{k}") for k, v in f.params.fields.items()}
        specs.append(FunctionSpec(f.name, params, dict(f.inputs), f.alias))
    return specs


def _state_params(state: pb.State, fdef: FunctionDef, path: str) -> dict[str, Any]:
    """The resolved parameters a state's params_json declares, checked like a request's."""
    field = f"{path}.params_json"
    if len(state.params_json) > MAX_PARAMS_JSON_BYTES:
        raise InvalidInput.single(field, f"expected at most {MAX_PARAMS_JSON_BYTES} bytes, got {len(state.params_json)}")
    if nested_deeper_than(state.params_json, MAX_PARAMS_JSON_NESTING):
        raise InvalidInput.single(field, f"expected JSON nested at most {MAX_PARAMS_JSON_NESTING} levels deep, got deeper")
    try:
        params = json.loads(state.params_json) if state.params_json else {}
    except (ValueError, RecursionError):
        raise InvalidInput.single(field, "expected the JSON object of the state's parameters, got invalid JSON") from None
    if not isinstance(params, dict):
        raise InvalidInput.single(field, f"expected a JSON object, got {type(params).__name__}")
    resolved: dict[str, Any] = resolve_params(fdef.params, params, field)
    return resolved


def state_from_proto(state: pb.State, path: str) -> State:
    """A client's state, validated against its function's declaration before anything merges it."""
    if not state.function:
        raise InvalidInput.single(f"{path}.function", "expected the function name of the state, got an empty string")
    try:
        fdef = get_function(state.function, path)
    except InvalidInput:
        raise InvalidInput.single(f"{path}.function", "unknown function; `lossd functions` lists the available ones") from None
    if fdef.name != state.function:
        raise InvalidInput.single(f"{path}.function", f"expected the canonical function name {fdef.name!r}, got an alias")
    if state.version != fdef.state_version:
        raise InvalidInput.single(
            f"{path}.version", f"this server reads version {fdef.state_version} states of {fdef.name}, got {state.version}"
        )
    params = _state_params(state, fdef, path)
    arrays: dict[str, np.ndarray] = {}
    for name, t in state.fields.items():
        field = f"{path}.fields.{name}"
        if t.dtype not in (pb.FLOAT64, pb.INT64):  # what every update produces; torch reads no other numpy dtype here
            raise InvalidInput.single(
                field, f"expected dtype float64 or int64, got {pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype}"
            )
        arrays[name] = _wire_array(t, field)[0]
    # batches as sent: every producer (this server, the client's compute="local", state files) copies a
    # kernel State's, which is at least 1, so a 0 is forged or hand-built, and check_state refuses it.
    decoded = State.from_arrays(state.function, state.version, state.params_json, arrays, batches=state.batches)
    check_state(decoded, fdef.fields, params, path)
    return decoded


def evaluation_to_proto(evaluation: Evaluation, request_id: str = "") -> pb.EvaluateResponse:
    """The response of an evaluation: results in request order, diagnostics, batches.

    One encoding with the client's compute="local" runs, which answer their
    updates with the same message for the same states."""
    return evaluation_to_response(evaluation, request_id)


def _value(v: object) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(list(v) if isinstance(v, tuple) else v, value)
    return value


def function_info(f: FunctionDef) -> pb.FunctionInfo:
    """ListFunctions' description of one function."""
    return pb.FunctionInfo(
        name=f.name,
        family=f.family,
        summary=f.summary,
        roles=[pb.RoleInfo(name=r.name, shape=r.shape, dtype=r.dtype, doc=r.doc, optional=r.optional) for r in f.roles],
        params=[
            pb.ParamInfo(
                name=p.name,
                type=p.kind,
                default=_value(p.default),
                doc=p.doc,
                range=p.range_text(),
                choices=list(p.choices or ()),
                nullable=p.nullable,
            )
            for p in f.params
        ],
        outputs=[pb.OutputInfo(name=o.name, doc=o.doc, tensor=o.tensor) for o in f.outputs],
        # Conservative for functions splittable only with some parameters (ppo_clip with
        # normalize_advantages): clients never split them; the server refuses only the bad case.
        splittable=f.splittable and f.splittable_if is None,
        reference=f.reference,
        aliases=list(f.aliases),
    )


def list_functions_response(functions: list[FunctionDef]) -> pb.ListFunctionsResponse:
    """ListFunctions' answer: the functions and every diagnostic code."""
    return pb.ListFunctionsResponse(
        functions=[function_info(f) for f in functions],
        diagnostics=[pb.DiagnosticInfo(code=c, severity=SEVERITY[s], meaning=m) for c, (s, m) in CODES.items()],
    )
