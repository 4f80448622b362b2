"""The gateway's JSON request models and their translation to lossd.v1 messages.

A tensor is ``{"dtype", "shape", "data": NESTED_LIST}`` or ``{"dtype",
"shape", "b64": BASE64_OF_RAW_LITTLE_ENDIAN_BYTES}``. Nested lists are for
small inputs and hand-written requests (``null`` and the strings "nan",
"inf", "-inf" are accepted in float tensors, as the responses write them);
base64 carries exactly the gRPC wire bytes and is the fast path.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lossd.client.codec import DTYPE_NAMES, encode_tensor
from lossd.client.specs import SpecError, spec_to_proto
from lossd.server.gateway.problems import Problem
from lossd.server.monitoring.tags import extra_tag_errors
from lossd.v1 import lossd_pb2 as pb

__all__ = ["TensorBody", "FunctionSpecBody", "TagsBody", "EvaluateBody", "tensor_to_proto", "request_to_proto"]

DType = Literal["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"]
_FLOATS = {"float32", "float16", "bfloat16", "float64"}


class TensorBody(BaseModel):
    """One tensor: its dtype, shape and either nested-list ``data`` or base64 ``b64`` bytes."""

    model_config = ConfigDict(extra="forbid")

    dtype: DType = Field(description="element type of the tensor")
    shape: list[int] = Field(description="dimensions, outermost first; [] is a scalar", examples=[[2, 3]])
    data: Any = Field(None, description="nested lists of numbers in row-major order, matching shape")
    b64: str | None = Field(None, description="base64 of the raw row-major little-endian bytes (itemsize × Π shape)")

    @model_validator(mode="after")
    def _one_payload(self) -> TensorBody:
        if (self.data is None) == (self.b64 is None):
            raise ValueError("expected exactly one of 'data' (nested lists) or 'b64' (base64 bytes)")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"expected non-negative dimensions, got shape {self.shape}")
        return self


class FunctionSpecBody(BaseModel):
    """A function to compute, as `lossd eval --fn` takes it in JSON."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="function name or alias from /v1/functions", examples=["cross_entropy"])
    params: dict[str, Any] = Field(default_factory=dict, description="parameters; omitted ones take their defaults")
    inputs: dict[str, str] = Field(default_factory=dict, description="role -> tensor name, for tensors not named after the role")
    alias: str = Field("", description="key of the result; defaults to name")


class TagsBody(BaseModel):
    """Monitoring tags: model/dataset/split label Prometheus series; any other key is a free-form tag.

    Free-form tags (``"step": "1200"``, ``"epoch": "3"``, ``"checkpoint": ...``)
    go to the dashboard's history only, never to Prometheus labels; numbers are
    accepted and sent as their decimal text. Bounds: :mod:`lossd.server.monitoring.tags`.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": {"type": ["string", "integer", "number"]}})

    model: str = ""
    dataset: str = ""
    split: str = ""

    @model_validator(mode="after")
    def _bounded_extra(self) -> TagsBody:
        extra = self.model_extra or {}
        for key, value in extra.items():
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"tags.{key}: expected a string or a number, got {type(value).__name__}")
        errors = extra_tag_errors(self.extra_tags(), prefix="tags")
        if errors:
            raise ValueError("; ".join(f"{field_}: {description}" for field_, description in errors))
        return self

    def extra_tags(self) -> dict[str, str]:
        """The free-form tags as the proto's ``Tags.extra`` carries them (numbers as decimal text)."""
        return {key: value if isinstance(value, str) else repr(value) for key, value in (self.model_extra or {}).items()}


class EvaluateBody(BaseModel):
    """POST /v1/evaluate: tensors, the functions to compute on them, monitoring tags."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "tensors": {
                        "logits": {"dtype": "float32", "shape": [2, 3], "data": [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]},
                        "labels": {"dtype": "int64", "shape": [2], "data": [0, 2]},
                    },
                    "functions": ["cross_entropy", {"name": "cross_entropy", "params": {"label_smoothing": 0.1}, "alias": "ce_ls"}],
                    "tags": {"model": "resnet50", "dataset": "imagenet", "split": "val"},
                }
            ]
        },
    )

    tensors: dict[str, TensorBody] = Field(description="tensors by name; functions read the tensors named after their roles")
    functions: list[str | FunctionSpecBody] = Field(description='function specs: "name", "name:param=value,...", or an object')
    tags: TagsBody = Field(default_factory=TagsBody)
    request_id: str = Field("", description="echoed in the backend's logs")
    nan_policy: Literal["propagate", "raise", "omit"] = Field(
        "propagate",
        description="NaN/inf in the tensors: propagate (NaN values, nan_or_inf diagnostic), raise (400 naming the tensor "
        "and index), omit (rows dropped, rows_omitted diagnostic)",
    )


def _decode_b64(name: str, body: TensorBody) -> pb.Tensor:
    try:
        raw = base64.b64decode(body.b64 or "", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Problem.bad_field(f"tensors.{name}.b64", f"expected standard base64, got invalid data ({exc})") from None
    return pb.Tensor(dtype=DTYPE_NAMES[body.dtype], shape=body.shape, data=raw)  # the backend checks len(data) against shape


def _float_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values in a float dtype of the wire (bfloat16 through float32, as the client encodes torch's)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(np.float32).astype(ml_dtypes.bfloat16)
    return array.astype(np.dtype(dtype))


def _first_bool(data: Any) -> tuple[int, ...] | None:
    """The index of the first JSON true/false in nested lists, or None (numpy would read them as 1 and 0)."""
    stack: list[tuple[tuple[int, ...], Any]] = [((), data)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, list):
            if any(type(x) is bool for x in item):
                return (*where, next(i for i, x in enumerate(item) if type(x) is bool))
            stack.extend(((*where, i), x) for i, x in reversed(list(enumerate(item))) if isinstance(x, list))
        elif type(item) is bool:
            return where
    return None


def _nested_array(name: str, body: TensorBody) -> np.ndarray:
    field_ = f"tensors.{name}.data"
    if body.dtype != "bool":
        found = _first_bool(body.data)
        if found is not None:
            at = "".join(f"[{i}]" for i in found)
            raise Problem.bad_field(
                field_, f"expected numbers for dtype {body.dtype}, got a JSON boolean at data{at}; send 0/1, or dtype bool"
            )
    try:
        if body.dtype in _FLOATS:
            array = np.asarray(body.data, dtype=np.float64)  # null -> NaN, "inf"/"-inf"/"nan" parsed
        else:
            array = np.asarray(body.data)
    except (ValueError, TypeError) as exc:
        raise Problem.bad_field(field_, f"expected rectangular nested lists of numbers, got {exc}") from None
    if array.size == 0 and 0 in body.shape:
        array = array.reshape(body.shape)  # [] is every empty shape: [0], [0, 4], ...
    if list(array.shape) != body.shape:
        raise Problem.bad_field(field_, f"nested lists have shape {list(array.shape)}, but shape says {body.shape}")
    if body.dtype in _FLOATS:
        # Judged on the cast itself: a value past the dtype's max that still rounds to it is kept,
        # one that rounds to inf is refused (bfloat16's max is below float32's, and rounding is per dtype).
        with np.errstate(over="ignore"):
            typed = _float_array(array, body.dtype)
        became_inf = np.isinf(typed) & np.isfinite(array)  # (isinf takes bfloat16: no float64 copy of the body)
        if became_inf.any():
            bad = array.reshape(-1)[int(np.argmax(became_inf.reshape(-1)))]
            import ml_dtypes  # its finfo knows bfloat16 (numpy's does not) and every numpy float

            limit = float(ml_dtypes.finfo(typed.dtype).max)  # type: ignore[no-untyped-call]
            raise Problem.bad_field(field_, f"value {bad!r} is outside the range of {body.dtype} (±{limit:.4g}); it would become inf")
        return typed
    if array.size and array.dtype.kind not in "biuf":
        raise Problem.bad_field(field_, f"expected numbers for dtype {body.dtype}, got elements of numpy dtype {array.dtype}")
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            bad = array.reshape(-1)[int(np.argmin(whole.reshape(-1)))]
            raise Problem.bad_field(field_, f"expected integers for dtype {body.dtype}, got {bad!r}")
    if body.dtype == "bool" and array.size and not np.isin(array, (0, 1)).all():
        raise Problem.bad_field(field_, "expected true/false or 0/1 for dtype bool")
    info = None if body.dtype == "bool" else np.iinfo(np.dtype(body.dtype))
    if info is not None and array.size and (array.min() < info.min or array.max() > info.max):
        raise Problem.bad_field(field_, f"values outside the range of {body.dtype} [{info.min}, {info.max}]")
    return array


def tensor_to_proto(name: str, body: TensorBody) -> pb.Tensor:
    """Convert a JSON tensor to the wire tensor the gRPC client would send."""
    if body.b64 is not None:
        return _decode_b64(name, body)
    array = _nested_array(name, body)  # float dtypes come typed already
    return encode_tensor(array if body.dtype in _FLOATS else array.astype(np.dtype(body.dtype)), name)


def request_to_proto(body: EvaluateBody) -> pb.EvaluateRequest:
    """Build the EvaluateRequest of a JSON body; malformed tensors and specs are 400s naming the field."""
    functions = []
    for i, spec in enumerate(body.functions):
        try:
            functions.append(spec_to_proto(spec if isinstance(spec, str) else spec.model_dump()))
        except SpecError as exc:
            raise Problem.bad_field(f"functions[{i}]", str(exc)) from None
    tensors = {name: tensor_to_proto(name, t) for name, t in body.tensors.items()}
    tags = pb.Tags(model=body.tags.model, dataset=body.tags.dataset, split=body.tags.split, extra=body.tags.extra_tags())
    nan_policy = pb.NanPolicy.Value(f"NAN_POLICY_{body.nan_policy.upper()}")
    return pb.EvaluateRequest(tensors=tensors, functions=functions, tags=tags, request_id=body.request_id, nan_policy=nan_policy)
