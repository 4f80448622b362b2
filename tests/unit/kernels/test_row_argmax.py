"""The row argmax lossd takes through numpy on CPU is torch's: first maximum on ties, NaN counted as the max, ±inf."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossd.kernels.row_stats import _block_argmax


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(40))
def test_block_argmax_is_torchs(dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, k = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    # Small integers: many ties in a row; then NaN and ±inf dropped in, and whole rows of them.
    x = rng.integers(-3, 4, (m, k)).astype(dtype) if seed % 2 else rng.standard_normal((m, k)).astype(dtype)
    for _ in range(int(rng.integers(0, 6))):
        x[rng.integers(0, m), rng.integers(0, k)] = rng.choice([np.nan, np.inf, -np.inf])
    x[0, :] = [-np.inf, np.nan, np.inf][seed % 3]
    z = torch.from_numpy(x)
    for block in (z, z.t().contiguous().t()):  # contiguous and column-major rows
        assert torch.equal(_block_argmax(block), block.argmax(dim=1))


def test_other_dtypes_keep_torchs_argmax() -> None:
    z = torch.tensor([[1.0, 3.0, 3.0], [float("nan"), 0.0, 1.0]], dtype=torch.bfloat16)
    assert torch.equal(_block_argmax(z), z.argmax(dim=1))
