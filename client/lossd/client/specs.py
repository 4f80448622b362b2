"""Function specs: the one syntax shared by ``lossd eval --fn``, the gateway and the client.

A spec is
- a function name: ``"cross_entropy"``;
- ``"name:param=value,param=value"`` with JSON scalar values:
  ``"ece:n_bins=15,norm=\\"l2\\""`` (bare words that are not JSON are strings: ``norm=l2``);
- a JSON object or mapping ``{"name", "params", "inputs", "alias"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from lossd.v1 import lossd_pb2 as pb

__all__ = ["SpecError", "parse_spec", "spec_to_proto", "spec_from_proto", "specs_to_proto"]

_SPEC_KEYS = {"name", "params", "inputs", "alias"}


class SpecError(ValueError):
    """A function spec that cannot be parsed; the message says what was expected."""


def _json_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: norm=l2


def parse_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse a spec into ``{"name", "params", "inputs", "alias"}``."""
    if isinstance(spec, Mapping):
        obj = dict(spec)
    else:
        text = spec.strip()
        if not text:
            raise SpecError("expected a function spec, got an empty string")
        if text.startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SpecError(f"expected a JSON object spec, got invalid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise SpecError(f"expected a JSON object spec, got {type(obj).__name__}")
        else:
            name, _, rest = text.partition(":")
            params: dict[str, Any] = {}
            if rest:
                for item in _split_params(rest):
                    key, eq, value = item.partition("=")
                    if not eq or not key.strip():
                        raise SpecError(f"expected param=value in {text!r}, got {item!r}")
                    if key.strip() in params:  # the last would win silently
                        raise SpecError(f"expected each parameter once in {text!r}, got {key.strip()!r} twice")
                    params[key.strip()] = _json_scalar(value.strip())
            obj = {"name": name.strip(), "params": params}
    unknown = set(obj) - _SPEC_KEYS
    if unknown:
        raise SpecError(f"unknown spec key(s) {sorted(unknown)}; expected {sorted(_SPEC_KEYS)}")
    if not isinstance(obj.get("name"), str) or not obj["name"]:
        raise SpecError(f"expected a function name (string) in the spec, got {obj.get('name')!r}")
    for key in ("params", "inputs"):
        if not isinstance(obj.get(key) or {}, Mapping):
            raise SpecError(f"expected {key!r} to be an object, got {type(obj[key]).__name__}")
    if not isinstance(obj.get("alias") or "", str):
        raise SpecError(f"expected 'alias' to be a string, got {obj['alias']!r}")
    return {
        "name": obj["name"],
        "params": dict(obj.get("params") or {}),
        "inputs": dict(obj.get("inputs") or {}),
        "alias": obj.get("alias") or "",
    }


def _split_params(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so lists like quantiles=[0.1,0.9] survive."""
    items, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "[{":
            depth += 1
        elif not quoted and ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0 and not quoted:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s for s in items if s.strip()]


def spec_to_proto(spec: str | Mapping[str, Any]) -> pb.FunctionSpec:
    """A spec (``"ece:n_bins=15"``, a JSON object string or a mapping) as a FunctionSpec."""
    obj = parse_spec(spec)
    params = struct_pb2.Struct()
    params.update(obj["params"])
    return pb.FunctionSpec(name=obj["name"], params=params, inputs={str(k): str(v) for k, v in obj["inputs"].items()}, alias=obj["alias"])


def specs_to_proto(specs: list[str | Mapping[str, Any]] | tuple[str | Mapping[str, Any], ...]) -> list[pb.FunctionSpec]:
    """Several specs as FunctionSpecs."""
    return [spec_to_proto(s) for s in specs]


def spec_from_proto(spec: pb.FunctionSpec) -> dict[str, Any]:
    """A FunctionSpec as ``{"name": ..., "alias": ..., "params": {...}}``."""
    from google.protobuf import json_format

    return {
        "name": spec.name,
        "params": json_format.MessageToDict(spec.params) if spec.HasField("params") else {},
        "inputs": dict(spec.inputs),
        "alias": spec.alias,
    }
