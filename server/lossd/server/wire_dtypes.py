"""Wire dtypes as the server reads them: one table and one zero-copy view, for message bytes and shared memory alike."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from lossd.client.codec import DTYPE_NAMES
from lossd.kernels.errors import InvalidInput
from lossd.v1 import lossd_pb2 as pb

__all__ = ["WIRE_DTYPES", "MAX_TENSOR_NDIM", "MAX_TENSOR_DIM", "wire_dtype", "check_wire_shape", "check_bool_bytes", "tensor_over"]

# Wire dtype -> the numpy dtype its bytes are read as, and the torch dtype of the tensor.
# bfloat16 is read as uint16 and viewed as torch.bfloat16: numpy has no bfloat16 of its own.
WIRE_DTYPES: dict[int, tuple[np.dtype, torch.dtype]] = {
    pb.FLOAT32: (np.dtype("<f4"), torch.float32),
    pb.FLOAT16: (np.dtype("<f2"), torch.float16),
    pb.BFLOAT16: (np.dtype("<u2"), torch.bfloat16),
    pb.FLOAT64: (np.dtype("<f8"), torch.float64),
    pb.INT64: (np.dtype("<i8"), torch.int64),
    pb.INT32: (np.dtype("<i4"), torch.int32),
    pb.UINT8: (np.dtype("u1"), torch.uint8),
    pb.BOOL: (np.dtype("?"), torch.bool),
}

# Bounds on what a wire tensor may declare, checked before numpy sees the shape:
# numpy stops at 64 dimensions, and a zero-size tensor may claim any other
# dimension (its byte length matches whatever they are).
MAX_TENSOR_NDIM = 32
MAX_TENSOR_DIM = 2**31 - 1


def check_wire_shape(shape: tuple[int, ...], field: str) -> None:
    """Refuse a declared shape numpy cannot take or that no real tensor has (message bytes and shared memory alike)."""
    if len(shape) > MAX_TENSOR_NDIM:
        raise InvalidInput.single(field, f"expected at most {MAX_TENSOR_NDIM} dimensions, got {len(shape)}")
    if shape and (min(shape) < 0 or max(shape) > MAX_TENSOR_DIM):
        bad = next(d for d in shape if d < 0 or d > MAX_TENSOR_DIM)
        raise InvalidInput.single(field, f"expected dimensions in [0, 2^31 - 1], got {bad} in shape of {len(shape)} dimensions")
    if (math.prod(shape) if 0 not in shape else math.prod(d for d in shape if d)) > MAX_TENSOR_DIM * 64:
        raise InvalidInput.single(field, "expected a shape whose non-zero dimensions multiply to at most 2^37 elements")


def check_bool_bytes(array: np.ndarray, field: str) -> None:
    """A BOOL tensor's bytes are 0 or 1 (the contract): another byte is refused, not read as True."""
    if array.dtype == np.bool_ and array.size:
        raw = array.view(np.uint8)
        if int(raw.max()) > 1:
            first = int(np.flatnonzero(raw.reshape(-1) > 1)[0])
            raise InvalidInput.single(field, f"expected BOOL bytes 0 or 1, got {int(raw.reshape(-1)[first])} at flat index {first}")


def wire_dtype(t: pb.Tensor, field: str) -> tuple[np.dtype, torch.dtype]:
    """(numpy dtype of the bytes, torch dtype) of a wire tensor; an unknown dtype is INVALID_ARGUMENT at ``field``."""
    wire = WIRE_DTYPES.get(t.dtype)
    if wire is None:
        got = pb.DType.Name(t.dtype) if t.dtype in pb.DType.values() else t.dtype
        raise InvalidInput.single(field, f"expected a dtype of {', '.join(DTYPE_NAMES)}, got {got}")
    return wire


def _over_read_only(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        # The buffer is read-only (a message's bytes, a read-only mapping) and nothing writes to request tensors.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


def _warns_every_time() -> bool:
    """Whether torch warns on every tensor over a read-only buffer, not once per process, as its TORCH_WARN_ONCE does.

    Spent here (silenced), the one warning costs no request anything: a
    warnings.catch_warnings around every tensor took 3 µs of a [64, 10]
    request's 17 µs of decoding. Should a torch warn every time, every
    tensor is made under catch_warnings, as before."""
    _over_read_only(np.frombuffer(bytes(4), dtype=np.float32))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.from_numpy(np.frombuffer(bytes(4), dtype=np.float32))
    return any("not writable" in str(w.message) for w in seen)


_QUIET_FROM_NUMPY = _over_read_only if _warns_every_time() else torch.from_numpy


def tensor_over(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor over ``array``'s read-only buffer (no copy), viewed as ``dtype`` (bfloat16 from uint16)."""
    tensor = _QUIET_FROM_NUMPY(array)
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor
