"""Requests from Python values: specs, tags, tensors, states; batches split into parts for streams.

Pure functions shared by the sync and asyncio clients, each testable alone.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from lossd.client.codec import encode_tensor, to_numpy
from lossd.client.specs import spec_to_proto
from lossd.client.wire import serialize_evaluate_request
from lossd.v1 import lossd_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Spec",
    "Functions",
    "TagsLike",
    "StatesLike",
    "function_specs",
    "tags_proto",
    "new_request_id",
    "batch_label",
    "in_batch",
    "nan_policy_value",
    "with_nan_policy",
    "arrays_of",
    "batch_bytes",
    "split_rows",
    "evaluate_request",
    "serialized_evaluate",
    "batch_requests",
    "named_states",
    "finalize_request",
    "splittable_names",
]

# A batch larger than this (bytes of all its tensors) goes over a stream in
# parts of about this size, when every function is splittable. Smaller parts
# overlap better (the server computes one while the next is on the wire) and
# the server holds fewer bytes at once: a [512, 128256] fp32 batch (263 MB) took
# 409 ms in 32 MiB parts against 544 ms in 64 MiB ones, 384 ms in 16 MiB (one
# run, medians of three). 32 MiB keeps a [4096, 1024] fp32 batch (16.8 MB) whole.
DEFAULT_CHUNK_BYTES = 32 << 20

Spec: TypeAlias = str | Mapping[str, Any] | pb.FunctionSpec
Functions: TypeAlias = Spec | Sequence[Spec]
TagsLike: TypeAlias = Mapping[str, str] | pb.Tags | None
StatesLike: TypeAlias = Mapping[str, pb.State] | Iterable[tuple[str, pb.State] | pb.NamedState | Mapping[str, pb.State]]

_TAG_KEYS = ("model", "dataset", "split")


def function_specs(functions: Functions) -> list[pb.FunctionSpec]:
    """One spec (``"ece:n_bins=15"``, a mapping, a FunctionSpec) or a sequence of them -> FunctionSpecs."""
    if isinstance(functions, (str, Mapping, pb.FunctionSpec)):
        functions = [functions]
    if not isinstance(functions, Sequence) or not functions:
        raise ValueError(f"expected at least one function spec, got {functions!r}")
    return [f if isinstance(f, pb.FunctionSpec) else spec_to_proto(f) for f in functions]


def tags_proto(tags: TagsLike) -> pb.Tags | None:
    """``{"model": ..., "dataset": ..., "split": ..., "step": 1200, ...}`` -> Tags.

    Keys other than model/dataset/split are free-form tags (``Tags.extra``: the
    dashboard's history, never Prometheus labels); numbers are sent as text."""
    if tags is None or isinstance(tags, pb.Tags):
        return tags
    if not isinstance(tags, Mapping):
        raise TypeError(f"expected tags as a mapping with keys {', '.join(_TAG_KEYS)} and free-form ones, got {type(tags).__name__}")
    extra: dict[str, str] = {}
    for key, value in tags.items():
        if key not in _TAG_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise TypeError(f"expected tag {key!r} to be a string, got {type(value).__name__}")
        if key not in _TAG_KEYS:
            extra[str(key)] = value
    return pb.Tags(**{k: v for k, v in tags.items() if k in _TAG_KEYS}, extra=extra)


def batch_label(index: int, batch_id: str = "", request_id: str = "") -> str:
    """Name batch ``index`` (from 0) of a run or stream, as errors and diagnostics do: batch 1 (batch_id 'b', request id 'r')."""
    where = ", ".join(f"{k} {v[:64]!r}" for k, v in (("batch_id", batch_id), ("request id", request_id)) if v)
    return f"batch {index}{f' ({where})' if where else ''}"


def in_batch(description: str, label: str) -> str:
    """A violation's description saying which batch brought it (``label``: :func:`batch_label`), on the server and in the client alike."""
    return f"{description}; in {label}"


def new_request_id() -> str:
    """A fresh request id (16 hex digits), to find a call in the server log."""
    return uuid.uuid4().hex[:16]


def arrays_of(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Tensors (numpy, torch, nested lists) by name as numpy arrays, without copies where possible."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"expected tensors as a mapping of name -> array, got {type(tensors).__name__}")
    return {str(name): to_numpy(value, str(name)) for name, value in tensors.items()}


def batch_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """The bytes of every tensor of a batch."""
    return sum(a.nbytes for a in arrays.values())


def split_rows(arrays: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Split a batch along dim 0 into parts of at most about ``max_bytes``.

    Only a batch whose tensors all share their first dimension can be split
    (a row of one belongs with the same row of the others); any other batch
    comes back whole.
    """
    if max_bytes <= 0:
        raise ValueError(f"expected max_bytes > 0, got {max_bytes}")
    total = batch_bytes(arrays)
    if total <= max_bytes or any(a.ndim == 0 for a in arrays.values()):
        return [dict(arrays)]
    leading = {int(a.shape[0]) for a in arrays.values()}
    if len(leading) != 1:
        return [dict(arrays)]
    (rows,) = leading
    parts = min(rows, math.ceil(total / max_bytes))
    if parts < 2:
        return [dict(arrays)]
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    return [{name: a[lo:hi] for name, a in arrays.items()} for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def evaluate_request(
    arrays: Mapping[str, Any],
    functions: Sequence[pb.FunctionSpec],
    *,
    tags: pb.Tags | None = None,
    return_state: bool = False,
    request_id: str = "",
    prior_states: Mapping[str, pb.State] | None = None,
    batch_id: str = "",
) -> pb.EvaluateRequest:
    """The EvaluateRequest of one batch (or one part of it, ``batch_id`` naming the batch)."""
    request = pb.EvaluateRequest(
        tensors={name: encode_tensor(a, name) for name, a in arrays.items()},
        functions=functions,
        return_state=return_state,
        request_id=request_id,
        prior_states=prior_states or {},
        batch_id=batch_id,
    )
    if tags is not None:
        request.tags.CopyFrom(tags)
    return request


NAN_POLICIES = ("propagate", "raise", "omit")


def nan_policy_value(policy: str | None) -> int:
    """The lossd.v1.NanPolicy number of ``policy`` (None: unset, the server's default, propagate)."""
    if policy is None:
        return int(pb.NAN_POLICY_UNSPECIFIED)
    if policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected one of {', '.join(NAN_POLICIES)}, got {policy!r}")
    return int(pb.NanPolicy.Value(f"NAN_POLICY_{policy.upper()}"))


def with_nan_policy(payload: bytes, policy: str | None) -> bytes:
    """A serialized EvaluateRequest with its nan_policy set (protobuf merges concatenated messages: the field is appended)."""
    value = nan_policy_value(policy)
    return payload + pb.EvaluateRequest(nan_policy=pb.NanPolicy.Name(value)).SerializeToString() if value else payload


def serialized_evaluate(
    arrays: Mapping[str, Any],
    functions: Sequence[pb.FunctionSpec],
    *,
    tags: pb.Tags | None = None,
    return_state: bool = False,
    request_id: str = "",
    prior_states: Mapping[str, pb.State] | None = None,
) -> bytes:
    """The bytes of :func:`evaluate_request`, with the tensors written straight from the arrays' memory."""
    rest = evaluate_request({}, functions, tags=tags, return_state=return_state, request_id=request_id, prior_states=prior_states)
    return serialize_evaluate_request(arrays, rest)


def batch_requests(
    index: int,
    parts: Sequence[Mapping[str, np.ndarray]],
    functions: Sequence[pb.FunctionSpec],
    *,
    tags: pb.Tags | None,
    return_state: bool,
    request_id: str,
    nan_policy: str | None = None,
) -> Iterator[bytes]:
    """Yield the serialized stream messages of batch ``index`` (0 first): one per part, parts sharing a batch_id.

    The first message of the stream names the functions, tags and options
    (``nan_policy`` included); later ones carry tensors only. Each message is
    written straight from its part's memory (:mod:`lossd.client.wire`) when
    the stream reads it: one copy of the tensors, none kept.
    """
    batch_id = f"batch-{index}" if len(parts) > 1 else ""
    for j, part in enumerate(parts):
        if index == 0 and j == 0:
            rest = evaluate_request({}, functions, tags=tags, return_state=return_state, request_id=request_id, batch_id=batch_id)
            yield with_nan_policy(serialize_evaluate_request(part, rest), nan_policy)
        else:
            yield serialize_evaluate_request(part, pb.EvaluateRequest(batch_id=batch_id))


def named_states(states: StatesLike) -> list[pb.NamedState]:
    """Collect states to finalize as NamedStates.

    ``states`` is ``{alias: State}``, or an iterable of (alias, State) pairs,
    NamedStates or ``{alias: State}`` mappings (one per rank or shard).
    """
    items: Iterable[Any] = [states] if isinstance(states, Mapping) else states
    out: list[pb.NamedState] = []
    for item in items:
        if isinstance(item, pb.NamedState):
            out.append(item)
        elif isinstance(item, Mapping):
            out.extend(_named(alias, state) for alias, state in item.items())
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(_named(*item))
        else:
            raise TypeError(f"expected (alias, State) pairs, NamedStates or {{alias: State}} mappings, got {type(item).__name__}")
    if not out:
        raise ValueError("expected at least one state to finalize, got none")
    return out


def finalize_request(
    states: StatesLike, *, tags: pb.Tags | None = None, return_state: bool = False, request_id: str = ""
) -> pb.FinalizeRequest:
    """The FinalizeRequest merging ``states`` (see :func:`named_states`)."""
    request = pb.FinalizeRequest(states=named_states(states), return_state=return_state, request_id=request_id)
    if tags is not None:
        request.tags.CopyFrom(tags)
    return request


def _named(alias: Any, state: Any) -> pb.NamedState:
    if not isinstance(alias, str) or not isinstance(state, pb.State):
        raise TypeError(f"expected an alias (str) and a lossd.v1.State, got {type(alias).__name__} and {type(state).__name__}")
    return pb.NamedState(alias=alias, state=state)


def splittable_names(catalogue: pb.ListFunctionsResponse) -> dict[str, bool]:
    """Map each function name and alias to whether a batch may be split into parts for it."""
    out = {}
    for f in catalogue.functions:
        for name in (f.name, *f.aliases):
            out[name] = f.splittable
    return out


def wants_per_element(specs: Sequence[pb.FunctionSpec]) -> bool:
    """Whether any function asks for reduction="none" (per-element values cannot be streamed)."""
    return any(s.params.fields["reduction"].string_value == "none" for s in specs if "reduction" in s.params.fields)
