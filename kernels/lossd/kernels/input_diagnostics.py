"""Input diagnostics: findings about a request's tensors that are not errors but must be seen.

Non-finite values (and float16 values at its limit), scores read as logits
that look like probabilities or log-probabilities, and rare classes in label
tensors.  Each is judged once per request and tensor, from what the batch
memo already holds where it can (the shared row statistics).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lossd.kernels import chunks
from lossd.kernels.batch import Batch
from lossd.kernels.dtypes import FLOAT_DTYPES
from lossd.kernels.row_stats import RowStats

__all__ = [
    "IMBALANCE_SHARE",
    "IMBALANCE_MIN_LABELS",
    "IMBALANCE_MAX_CLASSES",
    "count_nonfinite",
    "diagnose_nonfinite",
    "defer_nonfinite",
    "diagnose_score_kind",
    "diagnose_class_imbalance",
]

# class_imbalance: the rarest class present holds less than this share of the labels.
IMBALANCE_SHARE = 0.01
# Below this many labels a 1% share is less than one label; above this many
# classes a small share is what a uniform distribution gives.
IMBALANCE_MIN_LABELS = 100
IMBALANCE_MAX_CLASSES = 100


def count_nonfinite(t: torch.Tensor) -> tuple[int, bool]:
    """(number of NaN/inf values, whether a float16 tensor holds |value| >= 65504), block by block.

    ``torch.isfinite`` builds |t| and two boolean tensors of the full size, and
    ``t.sum(dtype=float32)`` of a half tensor casts all of it first; done in
    blocks, the check costs O(CHUNK_ELEMENTS) extra memory."""
    half = t.dtype == torch.float16
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if not t.is_contiguous():  # rare (a strided view): check it whole
        return int((~torch.isfinite(t)).sum()), half and bool((t.abs() >= 65504).any())
    # A tensor of one chunk is its own block: no reshape or slice (each an op of its own, which small requests pay).
    flat = t if t.numel() <= chunks.CHUNK_ELEMENTS else t.reshape(-1)
    bad, at_limit = 0, False
    for start in range(0, flat.numel(), chunks.CHUNK_ELEMENTS):
        block = flat if flat is t else flat[start : start + chunks.CHUNK_ELEMENTS]
        # Fast path: a finite sum, or a finite min and max, proves every element finite
        # (NaN and inf propagate); otherwise (possibly mere overflow of the sum) count exactly.
        if block.element_size() == 2:
            # 16-bit floats: aminmax reads them as they are, where sum(dtype=float32) casts the
            # block first (measured: 15x slower); the max and min also give the float16 limit.
            low, high = torch.aminmax(block)
            # Scalars judged in Python: torch.isfinite on a 0-d tensor is four ops of its own.
            lowest, highest = float(low), float(high)
            finite = math.isfinite(lowest) and math.isfinite(highest)
            if half and not at_limit:
                at_limit = highest >= 65504 or lowest <= -65504
        else:
            finite = math.isfinite(float(block.sum(dtype=acc)))
        if not finite:
            bad += int((~torch.isfinite(block)).sum())
    return bad, at_limit


def diagnose_nonfinite(batch: Batch, name: str, t: torch.Tensor) -> None:
    """nan_or_inf (and precision_loss for float16 overflow), once per request and tensor."""
    if name in batch._checked_finite:
        return
    batch._checked_finite.add(name)
    if t.dtype in FLOAT_DTYPES and t.numel():
        bad, at_limit = count_nonfinite(t)
        if bad:
            batch.diagnostics.add("nan_or_inf", f"tensor {name!r} holds {bad} NaN or infinite values")
            if t.dtype == torch.float16:
                batch.diagnostics.add(
                    "precision_loss",
                    f"float16 tensor {name!r} holds infinities, likely overflow beyond ±65504; send float32 or bfloat16",
                )
        elif t.dtype == torch.float16 and at_limit:
            batch.diagnostics.add(
                "precision_loss", f"float16 tensor {name!r} holds values at the float16 limit ±65504; send float32 or bfloat16"
            )


# Dtypes whose finiteness the CPU row statistics can prove (float16 also needs its ±65504 limit checked).
_SCREENED_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def defer_nonfinite(batch: Batch, name: str, t: torch.Tensor) -> None:
    """:func:`diagnose_nonfinite` for a score tensor, deferred until the next diagnostic is added or the diagnostics are read.

    Scores are usually read for their row statistics next, whose pass proves
    them finite for free (:attr:`lossd.kernels.row_stats.RowStats.finite`):
    then the full check is never run.  Deferred to the next diagnostic, the
    nan_or_inf finding keeps its place among the others."""
    if name in batch._checked_finite or name in batch._deferred_finite:
        return
    if t.device.type != "cpu" or t.dtype not in _SCREENED_DTYPES or t.ndim < 2 or not t.numel():
        diagnose_nonfinite(batch, name, t)
        return
    batch._deferred_finite.add(name)
    batch.diagnostics.defer(lambda: diagnose_nonfinite(batch, name, t))


def diagnose_score_kind(batch: Batch, name: str, t: torch.Tensor, stats: RowStats, class_dim: int, function: str) -> None:
    """Warn when "logits" look like probabilities or log-probabilities (never reinterpret them)."""
    if stats.max.numel() == 0 or stats.lse.shape == torch.Size([]):
        return
    if t.shape[class_dim] < 2:
        return
    # Both kinds need every row's max below a bound: one reduction answers both (a NaN row max gives a NaN peak,
    # which passes neither bound, as (max <= bound).all() is False for it).
    peak = float(stats.max.amax())
    if (
        peak <= 1
        and _lse_allows_probabilities(stats.lse, t.shape[class_dim])
        and bool(((stats.sum - 1).abs() < 1e-3).all())
        and bool(t.amin() >= 0)  # a NaN gives NaN here, hence False, as (t >= 0).all() does
    ):
        batch.diagnostics.add(
            "probabilities_as_logits",
            f"every row of {name!r} lies in [0, 1] and sums to 1: these look like probabilities "
            "read as logits; pass input_kind='probs' if they are",
            function=function,
        )
    elif peak <= 0 and bool((stats.lse.abs() < 1e-3).all()):
        batch.diagnostics.add(
            "log_probs_as_logits",
            f"every row of {name!r} is a normalized log-distribution; results are unaffected for "
            "softmax losses, but pass input_kind='log_probs' to say so",
            function=function,
        )


def diagnose_class_imbalance(batch: Batch, name: str, labels: torch.Tensor, valid: torch.Tensor, k: int) -> None:
    """class_imbalance, once per request and tensor: the rarest class present holds < 1% of the labels.

    Judged only with at least 100 labels, two classes present and at most 100
    classes, where a 1% share says something about the data. Request-level:
    every function reading these labels would say the same."""
    if k > IMBALANCE_MAX_CLASSES or name in batch._judged_balance:
        return
    batch._judged_balance.add(name)
    if labels.numel() < IMBALANCE_MIN_LABELS:  # fewer valid labels still: judged without selecting them
        return
    # Counting is integer work: numpy's on CPU (a few µs; torch's six small ops cost ~40 µs a request).
    if labels.device.type == "cpu":
        counts = np.bincount(labels.numpy()[valid.numpy()].reshape(-1), minlength=k)
    else:
        counts = torch.bincount(labels[valid].reshape(-1), minlength=k).cpu().numpy()
    n = int(counts.sum())
    if n < IMBALANCE_MIN_LABELS:
        return
    present = np.flatnonzero(counts)
    if present.size < 2:
        return
    rarest = int(present[np.argmin(counts[present])])  # the first of the rarest classes present
    share = int(counts[rarest]) / n
    if share < IMBALANCE_SHARE:
        batch.diagnostics.add(
            "class_imbalance",
            f"in tensor {name!r}, class {rarest} holds {int(counts[rarest])} of {n} labels ({share:.2%}); "
            "means and accuracy are dominated by the majority class, read per-class recall or macro F1 as well",
        )


def _lse_allows_probabilities(lse: torch.Tensor, k: int) -> bool:
    """Whether every row's logsumexp is one of scores in [0, 1] summing to 1 ± 1e-3 over ``k`` classes.

    For such scores Σ_k e^{z_k} lies between K·e^{s/K} (Jensen) and
    K + s·(e − 1) (e^z ≤ 1 + z·(e − 1) on [0, 1]), with s = Σz: a necessary
    condition read from the shared lse, which rules out logits and
    log-probabilities before the Σz pass over the scores is paid for."""
    low = math.log(k) + (1 - 1e-3) / k - 1e-3
    high = math.log(k + (1 + 1e-3) * (math.e - 1)) + 1e-3
    return bool(((lse >= low) & (lse <= high)).all())
