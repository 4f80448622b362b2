"""The dtypes lossd accepts and the dtype it computes in.

fp16/bf16/fp32 inputs are computed in fp32 and float64 stays float64, so a
value never depends on whether the caller sent half or single precision.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from lossd.kernels.errors import InvalidInput

__all__ = ["FLOAT_DTYPES", "INT_DTYPES", "as_dtype", "compute_dtype", "to_torch"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 inputs are computed in fp32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself when it already is (a no-op ``.to`` still costs a dispatch, which small requests pay)."""
    return t if t.dtype == dtype else t.to(dtype)


def to_torch(value: Any, name: str = "tensor") -> torch.Tensor:
    """A torch tensor from a torch tensor, a numpy array (ml_dtypes bfloat16 included) or nested lists."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(value).view(np.uint16).copy()).view(torch.bfloat16)
        if value.dtype == np.bool_ or value.dtype.kind in "iuf":
            with warnings.catch_warnings():
                # Read-only buffers (zero-copy decode of request bytes) are never written to.
                warnings.filterwarnings("ignore", message=".*not writable.*")
                return torch.from_numpy(value)
        raise InvalidInput.single(f"tensors.{name}", f"unsupported numpy dtype {value.dtype}")
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise InvalidInput.single(f"tensors.{name}", f"expected an array, got {type(value).__name__}: {exc}") from None
