"""Top-1 calibration counters of one evaluated batch, from what the evaluation already computed.

The class scores are the tensor that the request's functions read in the role
``logits`` (whatever its name: ``inputs: {"logits": "student_logits"}`` is
honoured), against that function's ``labels`` (or binary ``targets``):

- multiclass [N, K, d1, ...] scores: the row statistics the function memoized
  on the batch (argmax over the class dim 1; top-1 confidence 1 / Σ exp(z − max),
  as the ece functions bin it); rows are every position, ``ignore_index`` rows are left out;
- token-level [B, T, V] scores (``lm_cross_entropy``, ``perplexity``): top-1
  over the vocabulary (dim 2), rows are tokens, shifted as the function's
  ``shift`` says, ``ignore_index`` tokens left out;
- binary [N] logits with hard 0/1 targets: confidence σ(|z|), class 1
  predicted when z > 0 (the ``ece`` function's rule).

Rows with non-finite scores are left out (a NaN would poison a counter for
good). Bins are the catalogue's: bin b covers (b/B, (b+1)/B], 0 falls in bin 0.
When no counter can be exported the reason is returned instead (and counted
by monitoring as ``lossd_calibration_skipped_total{reason}``): nothing is
recomputed to make up for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lossd.kernels.batch import Batch
from lossd.kernels.calibration.bins import bin_sums
from lossd.kernels.dtypes import compute_dtype
from lossd.kernels.prepared import Prepared
from lossd.server.monitoring.small_calibration import SmallBatch, is_small, small_multiclass_many

__all__ = ["SKIP_REASONS", "Calibration", "calibration_counts", "calibration_counts_many"]

F64 = torch.float64

# Why a batch exported no calibration counters.
SKIP_REASONS = {
    "no_class_scores": "no requested function reads class scores (role 'logits')",
    "no_labels": "the class scores come without class labels (or binary targets)",
    "soft_targets": "the targets are soft probabilities, not classes",
    "probs_input": "the scores are probabilities or log-probabilities of a binary function, or input_kind='probs'",
    "multilabel_scores": "per-class binary scores [N, C] have no single top-1 class",
    "no_row_statistics": "the functions requested computed no row statistics of the scores",
    "shape_mismatch": "the labels' shape does not match the scores' rows",
    "queue_full": "a stream lost a message to the full monitoring queue",
}


@dataclass(frozen=True)
class Calibration:
    """Per-bin sums (float64 arrays of length B): rows, Σ top-1 confidence, Σ correct."""

    count: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray

    @property
    def total(self) -> float:
        """Rows binned."""
        return float(self.count.sum())

    def __add__(self, other: Calibration) -> Calibration:
        return Calibration(self.count + other.count, self.confidence + other.confidence, self.correct + other.correct)


def _is_token_level(p: Prepared) -> bool:
    # Language-model functions score [B, T, V] over their last dim; the others over dim 1.
    return bool(p.fdef.role("logits").shape.startswith("[B, T, V]"))


def _binned(confidence: torch.Tensor, correct: torch.Tensor, keep: torch.Tensor, bins: int, precision: torch.dtype = F64) -> Calibration:
    """Per-bin sums of the kept rows, against the edges rounded to ``precision`` (the confidences', as the ece functions bin them)."""
    sums = bin_sums(confidence[keep].to(F64), correct[keep], bins, precision=precision).cpu().numpy()
    return Calibration(sums[:, 0], sums[:, 1], sums[:, 2])


def _binary(z: torch.Tensor, t: torch.Tensor, bins: int) -> Calibration | str:
    if t.shape != z.shape:
        return "shape_mismatch"
    hard = (t == 0) | (t == 1)
    if not bool(hard.all()):
        return "soft_targets"
    x = z.to(F64)
    predicted = x > 0  # the [N, 2] argmax picks class 0 on ties
    return _binned(torch.sigmoid(x.abs()), predicted == (t == 1), torch.isfinite(x), bins)


def _multiclass(p: Prepared, batch: Batch, name: str, labels: torch.Tensor, bins: int) -> Calibration | SmallBatch | str:
    z = batch.tensors[name]
    token_level = _is_token_level(p)
    class_dim = 2 if token_level else 1
    stats = batch.memoized_row_stats(name, class_dim)
    if stats is None:
        return "no_row_statistics"
    if is_small(z, class_dim):  # the same numbers, without a dozen torch calls on a few hundred elements (binned later, together)
        small = SmallBatch(z, labels, token_level and bool(p.params.get("shift", False)), p.params.get("ignore_index"))
        return small if small.labels_fit() else "shape_mismatch"
    # The ECE functions' own confidences when they ran (exact at bin edges); otherwise one
    # pass here, on the monitoring worker, off the response path.
    confidence, predicted = batch.top1_confidence(name, class_dim), stats.argmax
    y = labels if not labels.is_floating_point() else labels.round()
    y = y.to(torch.int64)
    if tuple(y.shape) != tuple(confidence.shape):
        return "shape_mismatch"
    if token_level and p.params.get("shift", False):  # position t predicts token t + 1
        confidence, predicted, y = confidence[:, :-1], predicted[:, :-1], y[:, 1:]
    keep = (y >= 0) & (y < z.shape[class_dim]) & torch.isfinite(confidence)
    ignore_index = p.params.get("ignore_index")
    if ignore_index is not None:
        keep &= y != ignore_index
    return _binned(confidence, predicted == y, keep, bins, compute_dtype(z.dtype))


def _counts_of(p: Prepared, batch: Batch, bins: int) -> Calibration | SmallBatch | str:
    roles = {r.name for r in p.fdef.roles}
    if "logits" not in roles:
        return "no_class_scores"
    name = p.inputs.get("logits", "logits")
    z = batch.tensors.get(name)
    if z is None or not z.is_floating_point():
        return "no_class_scores"
    kind = p.params.get("input_kind", "logits")
    labels = batch.tensors.get(p.inputs.get("labels", "labels")) if "labels" in roles else None
    targets = batch.tensors.get(p.inputs.get("targets", "targets")) if "targets" in roles else None
    if z.ndim == 1:
        if targets is None:
            return "no_labels"
        return _binary(z, targets, bins) if kind == "logits" else "probs_input"
    if labels is None:
        if targets is not None:
            return "multilabel_scores"
        soft = "target_probs" in roles and batch.tensors.get(p.inputs.get("target_probs", "target_probs")) is not None
        return "soft_targets" if soft else "no_labels"
    if kind == "probs":
        return "probs_input"
    return _multiclass(p, batch, name, labels, bins)


def calibration_counts(batch: Batch, prepared: Sequence[Prepared], bins: int) -> Calibration | str:
    """The counters of the first function that reads class scores with labels, or why there are none.

    Reads the row statistics memoized on ``batch`` by the evaluation: never
    computes them (a lazily kept argmax is computed on its first read, once)."""
    return calibration_counts_many([(batch, prepared)], bins)[0]


def calibration_counts_many(batches: Sequence[tuple[Batch, Sequence[Prepared]]], bins: int) -> list[Calibration | str]:
    """:func:`calibration_counts` of each (batch, its functions), the small ones binned together (the same numbers)."""
    found = [_first_counts(batch, prepared, bins) for batch, prepared in batches]
    small = {i: counts for i, counts in enumerate(found) if isinstance(counts, SmallBatch)}
    done = dict(zip(small, (Calibration(*sums) for sums in small_multiclass_many(list(small.values()), bins)), strict=True))
    return [done[i] if isinstance(counts, SmallBatch) else counts for i, counts in enumerate(found)]


def _first_counts(batch: Batch, prepared: Sequence[Prepared], bins: int) -> Calibration | SmallBatch | str:
    reasons = []
    for p in prepared:
        counts = _counts_of(p, batch, bins)
        if not isinstance(counts, str):
            return counts
        reasons.append(counts)
    informative = [r for r in reasons if r != "no_class_scores"]
    return informative[0] if informative else "no_class_scores"
