"""Proto <-> lossd.kernels conversion: the only translation layer of the servicer."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from google.protobuf import json_format, struct_pb2

from lossd.client.codec import TensorError, decode_tensor, encode_tensor
from lossd.client.specs import spec_from_proto
from lossd.kernels import CODES, Evaluation, FunctionDef, FunctionSpec, State, to_torch
from lossd.kernels.diagnostics import Diagnostic
from lossd.kernels.errors import InvalidInput
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

_SEVERITY = {"info": pb.INFO, "warning": pb.WARNING, "error": pb.ERROR}


def decode_request_tensors(tensors: Mapping[str, pb.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Wire tensors -> torch tensors on ``device`` (zero-copy on the CPU)."""
    out = {}
    for name, t in tensors.items():
        try:
            array = decode_tensor(t, name)
        except TensorError as exc:
            raise InvalidInput.single(exc.field, exc.description) from None
        tensor = to_torch(array, name)
        out[name] = tensor.to(device, non_blocking=True) if device.type != "cpu" else tensor
    return out


def specs_from_request(functions: list[pb.FunctionSpec]) -> list[FunctionSpec]:
    specs = []
    for i, f in enumerate(functions):
        obj = spec_from_proto(f)
        if not obj["name"]:
            raise InvalidInput.single(f"functions[{i}].name", "expected a function name, got an empty string")
        specs.append(FunctionSpec(obj["name"], obj["params"], obj["inputs"], obj["alias"]))
    return specs


def state_from_proto(state: pb.State, path: str) -> State:
    arrays: dict[str, np.ndarray] = {}
    for name, t in state.fields.items():
        try:
            arrays[name] = decode_tensor(t, name)
        except TensorError as exc:
            raise InvalidInput.single(f"{path}.fields.{name}", exc.description) from None
    if not state.function:
        raise InvalidInput.single(f"{path}.function", "expected the function name of the state, got an empty string")
    return State.from_arrays(state.function, state.version, state.params_json, arrays, batches=max(1, state.batches))


def state_to_proto(state: State) -> pb.State:
    return pb.State(
        function=state.function,
        version=state.version,
        params_json=state.params,
        fields={k: encode_tensor(v, k) for k, v in state.to_arrays().items()},
        batches=state.batches,
    )


def diagnostic_to_proto(d: Diagnostic) -> pb.Diagnostic:
    return pb.Diagnostic(code=d.code, severity=_SEVERITY[d.severity], message=d.message, function=d.function, count=d.count)


def evaluation_to_proto(evaluation: Evaluation, request_id: str = "") -> pb.EvaluateResponse:
    results = []
    for r in evaluation.results.values():
        msg = pb.FunctionResult(
            alias=r.alias,
            function=r.function,
            values=r.values,
            tensors={k: encode_tensor(np.asarray(v, dtype=np.float64), k) for k, v in r.tensors.items()},
            denominator_kind=r.denominator_kind,
        )
        if r.denominator is not None:
            msg.denominator = r.denominator
        if r.state is not None:
            msg.state.CopyFrom(state_to_proto(r.state))
        results.append(msg)
    return pb.EvaluateResponse(
        results=results,
        diagnostics=[diagnostic_to_proto(d) for d in evaluation.diagnostics],
        request_id=request_id,
        batches=evaluation.batches,
    )


def _value(v: object) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(list(v) if isinstance(v, tuple) else v, value)
    return value


def function_info(f: FunctionDef) -> pb.FunctionInfo:
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
    return pb.ListFunctionsResponse(
        functions=[function_info(f) for f in functions],
        diagnostics=[pb.DiagnosticInfo(code=c, severity=_SEVERITY[s], meaning=m) for c, (s, m) in CODES.items()],
    )
