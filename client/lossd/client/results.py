"""Responses as plain Python: the JSON object that ``lossd eval --json`` and the gateway print.

``{"results": {ALIAS: NUMBER or {"value": NUMBER, OTHER_OUTPUT: ...}}, "diagnostics": [...]}``:
a function with a single scalar output maps to that number; one with several
outputs, or tensor outputs, maps to an object (tensors as nested lists).
"""

from __future__ import annotations

import math
from typing import Any

from lossd.client.codec import decode_tensor
from lossd.v1 import lossd_pb2 as pb

__all__ = ["response_to_json", "result_to_json", "diagnostic_to_json", "json_number", "catalogue_to_json"]


def json_number(x: float) -> float | str | None:
    """JSON has no NaN or infinity: NaN becomes null, ±inf the strings "inf"/"-inf"."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _nested(array: Any) -> Any:
    if array.ndim == 0:
        return json_number(float(array))
    return [_nested(a) for a in array]


def result_to_json(result: pb.FunctionResult) -> Any:
    """One function's result: its number, or an object of its outputs (tensors as nested lists)."""
    values = dict(result.values)
    tensors = {name: decode_tensor(t, name) for name, t in result.tensors.items()}
    if set(values) == {"value"} and not tensors:
        return json_number(values["value"])
    out: dict[str, Any] = {}
    if "value" in values:
        out["value"] = json_number(values.pop("value"))
    for name in sorted(values):
        out[name] = json_number(values[name])
    for name in sorted(tensors):
        out[name] = _nested(tensors[name].astype("float64"))
    if result.HasField("denominator"):
        out.setdefault("denominator", json_number(result.denominator))
    return out


def diagnostic_to_json(d: pb.Diagnostic) -> dict[str, Any]:
    """One diagnostic as a JSON object."""
    out: dict[str, Any] = {"code": d.code, "severity": pb.Severity.Name(d.severity).lower(), "message": d.message}
    if d.function:
        out["function"] = d.function
    if d.count > 1:
        out["count"] = d.count
    return out


def response_to_json(response: pb.EvaluateResponse) -> dict[str, Any]:
    """``{"results": ..., "diagnostics": [...]}`` of a response."""
    return {
        "results": {r.alias: result_to_json(r) for r in response.results},
        "diagnostics": [diagnostic_to_json(d) for d in response.diagnostics],
    }


def catalogue_to_json(response: pb.ListFunctionsResponse) -> dict[str, Any]:
    """The ListFunctions catalogue as JSON (``lossd functions --json`` and ``GET /v1/functions``).

    Protobuf ``Value`` numbers are doubles; defaults of integer parameters
    print as integers (``"n_bins": 15``, not ``15.0``)."""
    from google.protobuf import json_format

    obj: dict[str, Any] = json_format.MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for function in obj.get("functions", []):
        for param in function.get("params", []):
            default = param.get("default")
            if param.get("type") == "int" and isinstance(default, float) and default.is_integer():
                param["default"] = int(default)
    return obj
