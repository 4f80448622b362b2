"""Tensors on the wire: numpy / torch / nested lists <-> lossd.v1.Tensor.

Bytes are row-major and little-endian. Decoding is zero-copy
(``np.frombuffer`` over the message's bytes) and checks that the byte length
matches dtype × shape before anything reads it.  torch is never imported
here: torch tensors are recognized by duck typing and converted through
numpy, bfloat16 through ``ml_dtypes``, imported on the first bfloat16 tensor
(its import registers hundreds of ufunc loops: about a second of every
client's and server's start-up, for a dtype most never see).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lossd.v1 import lossd_pb2 as pb

__all__ = ["TensorError", "to_numpy", "encode_tensor", "decode_tensor", "encode_tensors", "decode_tensors", "DTYPE_NAMES", "dtype_of"]


@functools.cache
def bfloat16() -> np.dtype:
    """numpy's bfloat16 (``ml_dtypes.bfloat16``), imported on first use."""
    import ml_dtypes

    dtype: np.dtype = np.dtype(ml_dtypes.bfloat16)
    return dtype


# wire dtype <-> numpy dtype (little-endian); bfloat16 through bfloat16()
_TO_NUMPY: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.UINT8: np.dtype("u1"),
    pb.BOOL: np.dtype("?"),
}
DTYPE_NAMES: dict[str, pb.DType] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "bfloat16": pb.BFLOAT16,
    "float64": pb.FLOAT64,
    "int64": pb.INT64,
    "int32": pb.INT32,
    "uint8": pb.UINT8,
    "bool": pb.BOOL,
}
_NAME_OF: dict[int, str] = {v: k for k, v in DTYPE_NAMES.items()}


def _numpy_dtype(dtype: int) -> np.dtype:
    """The numpy dtype of a known wire dtype."""
    return bfloat16() if dtype == pb.BFLOAT16 else _TO_NUMPY[dtype]


class TensorError(ValueError):
    """A tensor that cannot be encoded or decoded; ``field`` names it (``tensors.logits``)."""

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description
        super().__init__(f"{field}: {description}")


# The native dtypes by value: a dict lookup, where ``dtype.name`` runs Python code in numpy on every call.
_WIRE_OF: dict[np.dtype, pb.DType] = {numpy: pb.DType.ValueType(wire) for wire, numpy in _TO_NUMPY.items()}


# What to cast a dtype the wire does not carry to, by kind: numpy's dtype.kind letters, "q" for torch's
# quantized integers. A person who sent float8 or complex scores needs the cast, not only the list.
_CASTS: dict[str, str] = {
    "f": "cast it to float32 first ({float32})",
    "c": "keep its real part or its magnitude and cast it to float32 first (.real{float32})",
    "i": "cast it to int64 (labels, indices) or float32 (values) first ({int64})",
    "u": "cast it to int64 (labels, indices) or float32 (values) first ({int64})",
    "q": "dequantize it to float32 first (.dequantize())",
}
_CONVERT = "convert it to numbers first: float32 for scores and targets, int64 for labels"


def _unsupported_dtype(field: str, name: str, kind: str, *, torch_tensor: bool = False) -> TensorError:
    """The TensorError of a dtype lossd does not carry: the dtypes it does, and the cast to make (torch or numpy spelling)."""

    def cast(target: str) -> str:
        return f".to(torch.{target})" if torch_tensor else f".astype(np.{target})"

    hint = _CASTS.get(kind, _CONVERT).format(float32=cast("float32"), int64=cast("int64"))
    return TensorError(field, f"unsupported dtype {name}; lossd carries {', '.join(DTYPE_NAMES)}: {hint}")


def _numpy_kind(dtype: np.dtype) -> str:
    """numpy's kind letter, with ml_dtypes' extension types (kind "V": float8, int4...) read from their names."""
    if dtype.kind != "V":
        return dtype.kind
    name = dtype.name
    return "f" if name.startswith(("float", "bfloat")) else "i" if name.startswith(("int", "uint")) else "V"


def dtype_of(array: np.ndarray, field: str) -> pb.DType:
    """The wire dtype of a numpy array; unsupported dtypes are refused, not converted."""
    wire = _WIRE_OF.get(array.dtype)
    if wire is not None:
        return wire
    name = array.dtype.name
    if name == "bfloat16" and array.dtype != bfloat16():  # a void dtype of that name, not ml_dtypes' (already imported: free)
        name = str(array.dtype)
    if name not in DTYPE_NAMES:
        raise _unsupported_dtype(field, name, _numpy_kind(array.dtype))
    return DTYPE_NAMES[name]


_TORCH_DTYPES = frozenset(f"torch.{name}" for name in DTYPE_NAMES)  # torch spells the wire dtypes as numpy does


def _torch_kind(dtype: Any) -> str:
    """The kind letter of a torch dtype (see :data:`_CASTS`); float8 counts as floating point."""
    name = str(dtype)
    if dtype.is_complex:
        return "c"
    if dtype.is_floating_point:
        return "f"
    return "q" if name.startswith("torch.q") else "i" if "int" in name else ""


def _torch_to_numpy(value: Any, field: str) -> np.ndarray:
    """A numpy array of a torch tensor; a dtype the wire does not carry is refused before numpy sees it.

    ``Tensor.numpy()`` raises a bare TypeError for float8 or quantized tensors, and
    converts uint16 or complex ones to arrays the wire refuses later under numpy's name."""
    name = str(value.dtype)
    if name not in _TORCH_DTYPES:
        raise _unsupported_dtype(field, name, _torch_kind(value.dtype), torch_tensor=True)
    try:
        t = value.detach().cpu()
        if name == "torch.bfloat16":
            import torch

            array: np.ndarray = t.contiguous().view(torch.int16).numpy().view(bfloat16())
        else:
            array = t.numpy()
    except (TypeError, RuntimeError, NotImplementedError) as exc:  # sparse layouts, meta tensors: no dense bytes to send
        raise TensorError(field, f"cannot read the torch tensor as a dense array ({exc})") from exc
    return array


def _as_numpy(value: Any, field: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.split(".")[0] == "torch":  # a torch.Tensor, without importing torch
        return _torch_to_numpy(value, field)
    if isinstance(value, np.generic):  # a numpy scalar: a 0-d array
        return np.asarray(value)
    if isinstance(value, (list, tuple, int, float, bool)):
        try:
            return np.asarray(value)
        except ValueError as exc:
            raise TensorError(field, f"expected a rectangular nested list, got ragged data ({exc})") from None
    raise TensorError(field, f"expected a numpy array, torch tensor or nested list, got {type(value).__name__}")


def to_numpy(value: Any, name: str = "tensor") -> np.ndarray:
    """A numpy array of a numpy array, torch tensor (bfloat16 included) or nested list; no copy where possible.

    A dtype the wire does not carry is refused here, where every path starts
    (unary, streams, runs, shared memory, compute="local"), so local compute
    refuses what the server would, with the same message."""
    field = f"tensors.{name}"
    array = _as_numpy(value, field)
    dtype_of(array, field)
    return array


def encode_tensor(value: Any, name: str = "tensor") -> pb.Tensor:
    """Encode an array-like as a wire tensor (a copy into the message's bytes)."""
    field = f"tensors.{name}"
    array = _as_numpy(value, field)
    dtype = dtype_of(array, field)
    wire = _numpy_dtype(dtype)
    if array.dtype.byteorder == ">":
        array = array.astype(wire)
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=np.ascontiguousarray(array).tobytes())


def decode_tensor(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """A read-only numpy view of a wire tensor's bytes, after checking dtype, shape and length."""
    field = f"tensors.{name}"
    if tensor.dtype not in _NAME_OF:
        raise TensorError(
            field,
            f"expected a dtype of {', '.join(DTYPE_NAMES)}, got {pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype}",
        )
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(field, f"expected non-negative dimensions, got shape {list(shape)}")
    dtype = _numpy_dtype(tensor.dtype)
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            field,
            f"byte length {len(tensor.data)} does not match dtype {_NAME_OF[tensor.dtype]} × shape {list(shape)} (expected {expected} bytes)",
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def encode_tensors(tensors: Mapping[str, Any]) -> dict[str, pb.Tensor]:
    """Encode every tensor of a mapping (name -> array-like)."""
    return {name: encode_tensor(value, name) for name, value in tensors.items()}


def decode_tensors(tensors: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    """Decode every wire tensor of a mapping."""
    return {name: decode_tensor(t, name) for name, t in tensors.items()}


def dtype_name(dtype: int) -> str:
    """The numpy name of a wire dtype (its number when unknown)."""
    return _NAME_OF.get(dtype, str(dtype))
