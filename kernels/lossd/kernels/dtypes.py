"""The dtypes lossd accepts and the dtype it computes in.

fp16/bf16/fp32 inputs are computed in fp32 and float64 stays float64, so a
value never depends on whether the caller sent half or single precision.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "INT_DTYPES", "as_dtype", "compute_dtype"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 inputs are computed in fp32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself when it already is (a no-op ``.to`` still costs a dispatch, which small requests pay)."""
    return t if t.dtype == dtype else t.to(dtype)
