"""Test helpers: reference comparison with a readable report, tolerances per dtype, random splits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# Absolute/relative tolerances of a value computed from inputs of this dtype
# against a float64 (or same-dtype torch) reference of the same inputs.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
    torch.bfloat16: dict(rtol=2e-3, atol=2e-4),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-6, atol: float = 1e-8, what: str = "value") -> None:
    """np.testing-style comparison that names what differs, where and by how much; NaNs must match."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    with np.errstate(invalid="ignore"):  # inf − inf where both are the same infinity: handled by same_inf
        diff = np.abs(a - e)
    bad = ~(both_nan | same_inf | (diff <= atol + rtol * np.abs(e)))
    if bad.any():
        idx = np.argwhere(bad)[0] if a.ndim else ()
        first = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements differ; first at {first}: "
            f"got {a[first]!r}, expected {e[first]!r} (|diff| {diff[first]:.3g}, rtol {rtol}, atol {atol})"
        )


def tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(TOL[dtype])


def random_splits(n: int, parts: int, rng: np.random.Generator) -> list[slice]:
    """``parts`` contiguous non-empty slices covering range(n), cut at random points."""
    parts = max(1, min(parts, n))
    cuts = sorted(rng.choice(np.arange(1, n), size=parts - 1, replace=False).tolist()) if parts > 1 else []
    bounds = [0, *cuts, n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def split_tensors(tensors: Mapping[str, torch.Tensor], s: slice, split_keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Slice every tensor (or those in ``split_keys``) along dim 0."""
    return {k: (v[s] if split_keys is None or k in split_keys else v) for k, v in tensors.items()}


def assert_merge_exact(
    tensors: Mapping[str, torch.Tensor],
    spec: Any,
    *,
    parts: int = 4,
    seed: int = 0,
    split_keys: Sequence[str] | None = None,
    rtol: float = 1e-9,
) -> None:
    """Split ``tensors`` at random points, accumulate states, compare with the unsplit evaluation."""
    from lossd.kernels import Accumulator, evaluate

    whole = evaluate(tensors, [spec])
    n = next(iter(tensors.values())).shape[0] if split_keys is None else tensors[split_keys[0]].shape[0]
    acc = Accumulator([spec])
    for s in random_splits(n, parts, np.random.default_rng(seed)):
        acc.add(split_tensors(tensors, s, split_keys))
    merged = acc.result()
    (alias,) = whole.results
    w, m = whole.results[alias], merged.results[alias]
    for key, value in w.values.items():
        if math.isnan(value):
            assert math.isnan(m.values[key]), f"{alias}.{key}: merged {m.values[key]} but unsplit NaN"
        else:
            assert_close(m.values[key], value, rtol=rtol, atol=1e-12, what=f"{alias}.{key} merged vs unsplit")
    for key, value in w.tensors.items():
        assert_close(m.tensors[key], value, rtol=rtol, atol=1e-12, what=f"{alias}.{key} merged vs unsplit")


def require_binary(name: str) -> str:
    """Return the path of an external program a test needs (prometheus, promtool, chromium...).

    Missing on a developer's machine: the test is skipped, saying what to install.
    Missing under CI (CI=true): the test fails, since CI installs it (scripts/install_e2e_deps.sh).
    """
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (run scripts/install_e2e_deps.sh)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip")
    pytest.skip(message)
