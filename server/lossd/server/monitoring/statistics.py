"""Sufficient statistics of one observed evaluation, as plain numbers for counters and history.

Everything exported is a sum, so that Prometheus (over replicas and time
windows) and the in-process history merge them exactly:

- per function alias whose value is an additive mean (a loss, accuracy, the
  LM loss; not ECE, AUROC or perplexity), the numerator and denominator the
  function itself declares (:attr:`lossd.kernels.FunctionResult.numerator`,
  set only for such means; under ``reduction="sum"`` the value is the numerator);
- per equal-width calibration bin, the count, the sum of top-1 confidences and
  the number of correct top-1 predictions, from the request's ``logits`` [N, K]
  and ``labels`` [N] (the catalogue's rule: bin b covers (b/B, (b+1)/B], 0
  falls in bin 0 and 1.0 in the last bin).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from lossd.kernels import Evaluation, finalize_states
from lossd.kernels.calibration import bin_sums
from lossd.kernels.plan import row_statistics
from lossd.server.service import Observation

__all__ = ["Calibration", "LossSums", "RowSummary", "calibration_counts", "loss_sums", "row_counts", "summarize_rows"]

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class LossSums:
    """One observation's contribution to each mean, by alias, plus what could not be counted."""

    sums: dict[str, tuple[float, float]]  # alias -> (numerator, denominator)
    skipped: dict[str, str]  # alias -> reason (non_finite, negative)


@dataclass(frozen=True)
class Calibration:
    """Per-bin sums (float64 arrays of length B)."""

    count: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray

    @property
    def total(self) -> float:
        return float(self.count.sum())


def _numerators(evaluation: Evaluation) -> dict[str, tuple[float, float]]:
    """Alias -> (numerator, denominator) of every result that declares itself an additive mean."""
    return {
        alias: (r.numerator, float(r.denominator))
        for alias, r in evaluation.results.items()
        if r.numerator is not None and r.denominator is not None
    }


def loss_sums(obs: Observation) -> LossSums:
    """Numerators and denominators this observation adds, for every result that is an additive mean.

    With ``prior_states`` the evaluation covers them too; their own values are
    finalized (cheap: these are small sums) and subtracted, so a client run
    sending one batch per call is counted once per batch, not once per call.
    """
    current = _numerators(obs.evaluation)
    for alias, state in obs.prior_states.items():
        if alias in current:
            prior = _numerators(finalize_states([(alias, state)])).get(alias, (0.0, 0.0))
            num, den = current[alias]
            current[alias] = (num - prior[0], den - prior[1])
    sums: dict[str, tuple[float, float]] = {}
    skipped: dict[str, str] = {}
    for alias, (num, den) in current.items():
        if den == 0:
            continue  # nothing evaluated (all ignored): a NaN mean adds nothing
        if not (math.isfinite(num) and math.isfinite(den)):
            skipped[alias] = "non_finite"
        elif num < 0 or den < 0:
            # Counters only grow; a negative contribution beyond rounding (a signed
            # metric such as a mean error) cannot be exported as a counter.
            if num > -1e-9 * max(1.0, abs(num) + abs(den)) and den >= 0:
                sums[alias] = (0.0, den)
            else:
                skipped[alias] = "negative"
        else:
            sums[alias] = (num, den)
    return LossSums(sums, skipped)


def calibration_counts(tensors: Mapping[str, torch.Tensor] | None, bins: int) -> Calibration | None:
    """Top-1 calibration sums of ``logits`` [N, K] against ``labels`` [N]; None when the request has no such pair.

    The confidences, argmax and bins are the ``ece`` function's own (shared row
    statistics, :func:`lossd.kernels.calibration.bin_sums`). Rows whose label is
    outside [0, K) (ignore_index) are left out, as ``ece`` leaves them out, and
    so are rows with non-finite logits, which would turn a counter into NaN for good.
    """
    if not tensors:
        return None
    logits, labels = tensors.get("logits"), tensors.get("labels")
    if logits is None or labels is None or logits.ndim != 2 or not logits.is_floating_point():
        return None
    if labels.dtype not in _INDEX_DTYPES or tuple(labels.shape) != (logits.shape[0],):
        return None
    stats = row_statistics(logits, 1, False)
    confidence = stats.top1_confidence
    labels = labels.to(torch.int64)
    keep = (labels >= 0) & (labels < logits.shape[1]) & torch.isfinite(confidence)
    sums = bin_sums(confidence[keep], stats.argmax[keep] == labels[keep], bins).cpu().numpy()
    return Calibration(sums[:, 0], sums[:, 1], sums[:, 2])


def row_counts(tensors: Mapping[str, torch.Tensor] | None) -> tuple[int, int]:
    """Count (rows, tokens) of a batch.

    Rows are dim 0 of ``labels`` (else ``logits``, else the first tensor);
    tokens are the label positions (``labels.numel()``, so [B, T] labels give B·T), else rows.
    """
    if not tensors:
        return 0, 0
    labels = tensors.get("labels")
    anchor = labels if labels is not None else tensors.get("logits", next(iter(tensors.values())))
    rows = int(anchor.shape[0]) if anchor.ndim else 1
    tokens = int(labels.numel()) if labels is not None else rows
    return rows, tokens


@dataclass(frozen=True)
class RowSummary:
    """Per-row statistics of one or more batches: calibration sums, rows and tokens; ``+`` merges two."""

    calibration: Calibration | None
    rows: int
    tokens: int

    def __add__(self, other: RowSummary) -> RowSummary:
        a, b = self.calibration, other.calibration
        merged = a if b is None else b if a is None else Calibration(a.count + b.count, a.confidence + b.confidence, a.correct + b.correct)
        return RowSummary(merged, self.rows + other.rows, self.tokens + other.tokens)


def summarize_rows(tensors: Mapping[str, torch.Tensor] | None, bins: int) -> RowSummary:
    """The :class:`RowSummary` of one batch."""
    rows, tokens = row_counts(tensors)
    return RowSummary(calibration_counts(tensors, bins), rows, tokens)
