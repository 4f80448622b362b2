"""The small-batch calibration path gives the general path's counters bit for bit (ties, edges, non-finite rows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from lossd.kernels import evaluate
from lossd.server.monitoring import calibration, calibration_counts
from lossd.server.monitoring.small_calibration import SMALL_ELEMENTS, SmallBatch, is_small, small_multiclass, small_multiclass_many

BINS = (10, 15, 7)


def _hostile_logits(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random scores with tied rows (top-1 exactly 1/2, 1/3, 1/5: bin edges), huge and non-finite entries."""
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    flat = z.reshape(-1, shape[-1])
    flat[0::7, :2] = 1.25  # two tied maxima: confidence exactly 1/2 when the rest is far below
    flat[0::7, 2:] = -80.0
    flat[3::11, :3] = 0.0  # three tied maxima: 1/3
    flat[3::11, 3:] = -90.0
    if shape[-1] > 5:  # five tied maxima: the compute dtype's nearest 1/5, on its edge 0.2 (not representable in float32)
        flat[8::29, :5] = 0.5
        flat[8::29, 5:] = -90.0
    flat[5::13] *= 40  # maxima beyond ±60: the shifted exponentials
    flat[1::17, 1] = float("inf")
    flat[2::19, 0] = float("nan")
    flat[4::23, :] = float("-inf")
    return z.to(dtype)


def _labels(g: torch.Generator, shape: tuple[int, ...], k: int) -> torch.Tensor:
    y = torch.randint(0, k, shape, generator=g)
    flat = y.reshape(-1)
    flat[6::9] = -100  # the default ignore_index: never binned
    return y


def _both_paths(monkeypatch: pytest.MonkeyPatch, tensors: dict[str, torch.Tensor], functions: list[Any], bins: int) -> tuple[Any, Any]:
    evaluation = evaluate(tensors, functions, nan_policy="propagate")
    small = calibration_counts(evaluation.batch, evaluation.prepared, bins)
    with monkeypatch.context() as m:
        m.setattr(calibration, "is_small", lambda z, class_dim: False)
        general = calibration_counts(evaluate(tensors, functions, nan_policy="propagate").batch, evaluation.prepared, bins)
    return small, general


def _assert_identical(small: Any, general: Any) -> None:
    assert isinstance(small, calibration.Calibration) and isinstance(general, calibration.Calibration)
    for field in ("count", "confidence", "correct"):
        a, b = getattr(small, field), getattr(general, field)
        assert a.dtype == b.dtype == np.float64 and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), f"{field}: {a} != {b}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 10), (1, 3), (257, 2), (300, 100)])
def test_multiclass_counters_equal_the_general_path(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    tensors = {"logits": _hostile_logits(g, shape, dtype), "labels": _labels(g, shape[:1], shape[1])}
    assert is_small(tensors["logits"], 1)
    for bins in BINS:
        small, general = _both_paths(monkeypatch, tensors, ["cross_entropy"], bins)
        _assert_identical(small, general)
        assert small.total > 0


def test_float_labels_ece_memo_and_ignore_index_equal_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(7)
    logits = _hostile_logits(g, (128, 6), torch.float32)
    labels = _labels(g, (128,), 6)
    labels[labels == -100] = 3  # this request's ignore_index (the others count these rows)
    labels = labels.to(torch.float32)  # integer-valued floats: rounded and cast, as the general path does
    functions = [{"name": "cross_entropy", "params": {"ignore_index": 3}}, "ece", "accuracy"]
    small, general = _both_paths(monkeypatch, {"logits": logits, "labels": labels}, functions, 15)
    _assert_identical(small, general)


@pytest.mark.parametrize("shift", [True, False])
def test_token_level_counters_equal_the_general_path(monkeypatch: pytest.MonkeyPatch, shift: bool) -> None:
    g = torch.Generator().manual_seed(11)
    logits = _hostile_logits(g, (4, 9, 33), torch.float32)
    labels = _labels(g, (4, 9), 33)
    functions = [{"name": "lm_cross_entropy", "params": {"shift": shift}}]
    assert is_small(logits, 2)
    small, general = _both_paths(monkeypatch, {"logits": logits, "labels": labels}, functions, 15)
    _assert_identical(small, general)


def test_large_non_class_last_and_shape_mismatch_take_or_refuse_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.randn(SMALL_ELEMENTS // 8 + 1, 8)
    assert not is_small(big, 1) and not is_small(torch.randn(4, 3, 5), 1) and not is_small(torch.randn(8, 4).t(), 1)
    evaluation = evaluate({"logits": torch.randn(6, 4), "labels": torch.randint(0, 4, (6,))}, ["cross_entropy"])
    mismatched = {**evaluation.batch.tensors, "labels": torch.randint(0, 4, (6, 1))}
    evaluation.batch.tensors = mismatched
    assert calibration_counts(evaluation.batch, evaluation.prepared, 15) == "shape_mismatch"


def test_batches_binned_together_equal_each_alone() -> None:
    g = torch.Generator().manual_seed(21)
    batches = []
    for i in range(70):  # one size, more batches than one torch call takes (SMALL_ELEMENTS // 640 = 51)
        batches.append(SmallBatch(_hostile_logits(g, (64, 10), torch.float32), _labels(g, (64,), 10), False, -100 if i % 3 else None))
    for shape, dtype in [((257, 2), torch.float64), ((1, 3), torch.float32), ((64, 10), torch.bfloat16), ((9, 10), torch.float32)]:
        batches.insert(len(batches) // 2, SmallBatch(_hostile_logits(g, shape, dtype), _labels(g, shape[:1], shape[1]), False, -100))
    batches += [SmallBatch(_hostile_logits(g, (64, 10), torch.float16), _labels(g, (64,), 10), False, 7)]  # apart from its size's others
    for b, t in [(4, 9), (3, 5), (4, 9)]:  # token-level, shifted: pairs stay within each sequence
        batches.append(SmallBatch(_hostile_logits(g, (b, t, 33), torch.float32), _labels(g, (b, t), 33), True, -100))
    assert all(is_small(b.scores, b.scores.ndim - 1) and b.labels_fit() for b in batches)
    for bins in BINS:
        together = small_multiclass_many(batches, bins)
        assert len(together) == len(batches)
        for b, sums in zip(batches, together, strict=True):
            alone = small_multiclass(b.scores, b.labels, bins, shift=b.shift, ignore_index=b.ignore_index)
            assert not isinstance(alone, str)
            for name, x, y in zip(("count", "confidence", "correct"), sums, alone, strict=True):
                assert x.dtype == y.dtype == np.float64 and x.tobytes() == y.tobytes(), f"{name}: {x} != {y}"
        assert sum(float(s[0].sum()) for s in together) > 0


def test_token_level_batches_binned_together_equal_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(23)
    evaluations, functions = [], [{"name": "lm_cross_entropy", "params": {"shift": True}}]
    for b, t in [(4, 9), (2, 6), (4, 9)]:
        tensors = {"logits": _hostile_logits(g, (b, t, 17), torch.float32), "labels": _labels(g, (b, t), 17)}
        evaluations.append((tensors, evaluate(tensors, functions, nan_policy="propagate")))
    together = calibration.calibration_counts_many([(e.batch, e.prepared) for _, e in evaluations], 15)
    with monkeypatch.context() as m:
        m.setattr(calibration, "is_small", lambda z, class_dim: False)
        for (tensors, e), small in zip(evaluations, together, strict=True):
            general = calibration_counts(evaluate(tensors, functions, nan_policy="propagate").batch, e.prepared, 15)
            _assert_identical(small, general)
