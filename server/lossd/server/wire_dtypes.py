"""Wire dtypes as the server reads them: one table and one zero-copy view, for message bytes and shared memory alike."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from lossd.client.codec import DTYPE_NAMES
from lossd.kernels.errors import InvalidInput
from lossd.v1 import lossd_pb2 as pb

__all__ = ["WIRE_DTYPES", "wire_dtype", "tensor_over"]

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
