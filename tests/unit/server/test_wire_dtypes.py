"""Tensors over read-only request bytes: no copy, and no warning (torch's one warning is spent, silenced, at import)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from lossd.server.wire_dtypes import tensor_over


def test_tensors_over_read_only_bytes_warn_nothing_and_copy_nothing() -> None:
    data = np.arange(8, dtype=np.float32).tobytes()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tensors = [tensor_over(np.frombuffer(data, dtype=np.float32), torch.float32) for _ in range(3)]
    assert not seen, [str(w.message) for w in seen]
    assert all(t.tolist() == list(range(8)) for t in tensors)
    assert tensors[0].data_ptr() == tensors[1].data_ptr()  # all three over the same bytes


def test_bfloat16_is_viewed_from_its_uint16_bits() -> None:
    bits = torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.uint16).numpy().tobytes()
    assert tensor_over(np.frombuffer(bits, dtype=np.uint16), torch.bfloat16).tolist() == [1.5, -2.0]
