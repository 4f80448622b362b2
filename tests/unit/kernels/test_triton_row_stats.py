"""The Triton row-statistics kernel against its torch reference, under TRITON_INTERPRET=1 on CPU.

TRITON_INTERPRET must be set before triton is imported, so the kernel runs in
a child process: one for all cases (triton's import is paid once), which
reads the inputs built here and writes back the kernel's and the reference's
outputs.  Argument checks, and the rule that only a missing triton sends
row_statistics to torch, are tested in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import assert_close
from lossd.kernels import row_stats as shared_row_stats

pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the lossd-kernels[triton] extra)")

from lossd.kernels.triton import row_stats  # noqa: E402

INF, NAN = float("inf"), float("nan")

CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import numpy as np
    import torch
    from lossd.kernels.triton.row_stats import row_statistics_triton, row_stats_reference, row_stats_triton

    np.seterr(divide="ignore", invalid="ignore")  # the interpreter computes with numpy: log(0) = -inf is meant
    cases, layouts = torch.load(sys.argv[1])
    out = {name: (tuple(row_stats_triton(x, block_size=block)), tuple(row_stats_reference(x))) for name, (x, block) in cases.items()}
    out.update({name: tuple(row_statistics_triton(x, dim)) for name, (x, dim) in layouts.items()})
    torch.save(out, sys.argv[2])
    """
)


def extreme_rows(k: int) -> torch.Tensor:
    """Rows of −inf, ±1e4, +inf, NaN and mixtures, [8, k] (k >= 8)."""
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(1)) * 3
    x[0] = -INF  # lse = max = −inf, argmax 0
    x[1, ::2], x[1, 1::2] = 1e4, -1e4  # the max on a tie: first index
    x[2] = 1e4  # all equal
    x[3, k - 1] = 1e4  # the max in the last (partial) block
    x[4, : k // 2] = -INF  # −inf before the max
    x[5, 3] = INF  # lse = max = +inf
    x[6, 2], x[6, k - 2] = NAN, NAN  # NaN wins, first NaN's index
    x[7, 1], x[7, 4] = INF, -INF  # Σz = NaN
    return x


def _cases() -> dict[str, tuple[torch.Tensor, int | None]]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 50, generator=g) * 4
    cases: dict[str, tuple[torch.Tensor, int | None]] = {
        "odd_k_larger_than_block": (torch.randn(5, 37, generator=g) * 3, 16),
        "k_not_power_of_2": (torch.randn(6, 1000, generator=g) * 3, None),
        "many_blocks": (torch.randn(2, 20000, generator=g) * 3, 4096),
        "k_1": (torch.randn(4, 1, generator=g), None),
        "extremes": (extreme_rows(37), 16),
        "extremes_one_block": (extreme_rows(37), None),
        "strided_rows": (wide[:, :37], 16),
        "no_rows": (torch.empty(0, 9), None),
    }
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        cases[f"odd_k_{name}"] = (cases["odd_k_larger_than_block"][0].to(dtype), 16)
        cases[f"extremes_{name}"] = (extreme_rows(37).to(dtype), 16)
    return cases


def _layouts() -> dict[str, tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(2)
    return {"classes_on_dim_1": (torch.randn(3, 7, 4, generator=g), 1), "classes_last": (torch.randn(2, 5, 33, generator=g), 2)}


CASES = _cases()
LAYOUTS = _layouts()


def assert_values_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str) -> None:
    """NaN where the reference has NaN, the same infinities, finite values within rtol/atol."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaNs at {actual.isnan().tolist()}, expected {expected.isnan().tolist()}"
    infinite = expected.isinf()
    assert torch.equal(actual[infinite], expected[infinite]) and not bool(actual[~infinite].isinf().any()), (
        f"{what}: {actual} != {expected}"
    )
    finite = expected.isfinite()
    assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol, what=what)


def assert_sums_close(total: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, *, what: str) -> None:
    """Σz per row within float32 rounding of Σ|z| (the kernel adds block by block, torch pairwise)."""
    size = x.to(torch.float64).abs().sum(1).reshape(expected.shape)
    finite = torch.isfinite(size)
    assert_values_close(total[~finite], expected[~finite], rtol=0, atol=0, what=f"{what} (rows with inf or NaN)")
    error = (total[finite].double() - expected[finite].double()).abs()
    assert bool((error <= 1e-6 * size[finite] + 1e-6).all()), f"{what}: {total.tolist()} != {expected.tolist()}"


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("triton_row_stats")
    inputs, outputs = folder / "inputs.pt", folder / "outputs.pt"
    torch.save((CASES, LAYOUTS), inputs)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(inputs), str(outputs)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"the interpreted kernel failed:\n{done.stderr[-4000:]}"
    return torch.load(outputs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(kernel_outputs, case):
    (lse, mx, argmax, total), (ref_lse, ref_max, ref_argmax, ref_total) = kernel_outputs[case]
    x = CASES[case][0]
    assert lse.dtype == mx.dtype == total.dtype == torch.float32 and argmax.dtype == torch.int64
    assert lse.shape == (x.shape[0],)
    assert_values_close(lse, ref_lse, rtol=2e-6, atol=2e-6, what=f"{case}: lse")
    assert_values_close(mx, ref_max, rtol=0, atol=0, what=f"{case}: max")
    assert torch.equal(argmax, ref_argmax), f"{case}: argmax {argmax.tolist()} != reference {ref_argmax.tolist()}"
    assert_sums_close(total, ref_total, x, what=f"{case}: sum")


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_any_layout_matches_the_torch_path(kernel_outputs, case):
    x, dim = LAYOUTS[case]
    lse, mx, argmax, total = kernel_outputs[case]
    ref = shared_row_stats.row_statistics(x, dim, False)
    assert lse.shape == ref.lse.shape == x.shape[:dim] + x.shape[dim + 1 :]
    assert_close(lse, ref.lse, rtol=2e-6, atol=2e-6, what="lse")
    assert_close(mx, ref.max, rtol=0, atol=0, what="max")
    assert torch.equal(argmax, ref.argmax)
    assert_sums_close(total, ref.sum, x.movedim(dim, -1).reshape(-1, x.shape[dim]), what="sum")


@pytest.mark.parametrize(
    "x, kwargs, error, match",
    [
        (torch.randn(4, 5, dtype=torch.float64), {}, TypeError, "float64 scores belong on the torch path"),
        (torch.arange(10).reshape(2, 5), {}, TypeError, "expects float16, bfloat16 or float32"),
        (torch.randn(7), {}, ValueError, r"expects scores \[M, K\], got shape \[7\]"),
        (torch.randn(3, 0), {}, ValueError, "at least one class per row, got K=0"),
        (torch.randn(5, 4).t(), {}, ValueError, "contiguous classes"),
        (torch.randn(2, 5), {"block_size": 24}, ValueError, "power of two"),
        (torch.randn(2, 5), {"block_size": 8}, ValueError, "power of two in"),
        (torch.randn(2, 5), {"block_size": 2 * row_stats.MAX_BLOCK_SIZE}, ValueError, "power of two in"),
    ],
)
def test_launcher_refuses_what_it_cannot_take(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        row_stats.row_stats_triton(x, **kwargs)


@pytest.fixture
def fresh_kernel_lookup(monkeypatch: pytest.MonkeyPatch):
    """shared_row_stats._row_stats_kernel memoizes its import; forget it around the test, and the kernel module too."""
    import lossd.kernels.triton as package

    shared_row_stats._row_stats_kernel.cache_clear()
    monkeypatch.delitem(sys.modules, "lossd.kernels.triton.row_stats")
    monkeypatch.delattr(package, "row_stats")  # else `from package import row_stats` finds it there
    yield monkeypatch
    shared_row_stats._row_stats_kernel.cache_clear()


def test_missing_triton_means_the_torch_path(fresh_kernel_lookup):
    fresh_kernel_lookup.setitem(sys.modules, "triton", None)  # `import triton` now raises ModuleNotFoundError
    assert shared_row_stats._row_stats_kernel() is None


def test_a_broken_kernel_module_is_raised_not_skipped(fresh_kernel_lookup):
    fresh_kernel_lookup.setitem(sys.modules, "lossd.kernels.triton.row_stats", None)
    with pytest.raises(ModuleNotFoundError, match="row_stats"):
        shared_row_stats._row_stats_kernel()


def test_the_kernel_module_is_found_when_triton_is_installed():
    shared_row_stats._row_stats_kernel.cache_clear()
    try:
        assert shared_row_stats._row_stats_kernel() is row_stats
    finally:
        shared_row_stats._row_stats_kernel.cache_clear()
