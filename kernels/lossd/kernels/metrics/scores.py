"""The scores and truth the classification metrics read: binary or multiclass, checked once.

Binary metrics take logits [N] with ``targets`` in {0, 1}; multiclass ones
take logits [N, K, d...] with class ``labels``; sending both or neither is
an error.  Predictions and probabilities come from the shared row statistics
(argmax, logsumexp), so accuracy, F1, log loss and cross-entropy of the same
logits make one pass over them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lossd.kernels.declarations import Example, Role
from lossd.kernels.examples import K, normal
from lossd.kernels.examples import class_labels as example_labels
from lossd.kernels.losses.classification import check_logits, class_labels
from lossd.kernels.params import Param
from lossd.kernels.view import View

__all__ = [
    "LOGITS",
    "LABELS",
    "TARGETS",
    "THRESHOLD",
    "MULTICLASS_EXAMPLE",
    "is_binary",
    "binary_inputs",
    "binary_log_probs",
    "log1mexp",
    "binary_predictions",
    "multiclass",
    "truth_and_predictions",
    "diagnose_imbalance",
    "nan_average",
]

LOGITS = Role(
    "logits",
    "[N] (binary, with targets) or [N, K] / [N, K, d1, ...] (multiclass, with labels)",
    "float",
    "scores: logits unless input_kind says otherwise",
)
LABELS = Role(
    "labels", "[N] or [N, d1, ...]", "index", "multiclass truth: class indices in [0, K) or ignore_index", optional=True, one_of="truth"
)
TARGETS = Role("targets", "[N]", "binary", "binary truth in {0, 1}, with logits [N]", optional=True, one_of="truth")
THRESHOLD = Param(
    "threshold",
    "float",
    0.0,
    "binary inputs: predict 1 where the logit > threshold (probs / log_probs: where p > σ(threshold))",
)

# Every class present, none rare: the clean example of the multiclass metrics.
MULTICLASS_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, K), "labels": example_labels(n)})


# -- inputs ----------------------------------------------------------------------------------------
def is_binary(view: View) -> bool:
    """Binary when ``targets`` is sent, multiclass when ``labels`` is; both or neither is an error."""
    has_targets, has_labels = view.has("targets"), view.has("labels")
    if has_targets and has_labels:
        raise view.error(
            "targets", "send either targets ({0, 1}, with logits [N]) or labels (class indices, with logits [N, K, ...]), not both"
        )
    if not (has_targets or has_labels):
        raise view.error("labels", "needs labels (class indices, with logits [N, K, ...]) or targets ({0, 1}, with logits [N])")
    return has_targets


def binary_inputs(view: View, *, hard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N] as sent, targets [N] as floats), targets in {0, 1} unless ``hard`` is False."""
    z = view.scores("logits")
    if z.ndim != 1:
        raise view.error(
            "logits", f"binary inputs (targets sent) take logits of shape [N], got {list(z.shape)}; multiclass logits need labels"
        )
    y = view.binary_targets("targets")
    view.expect_shape("targets", y, z.shape, "one target per logit")
    if hard:
        soft = (y != 0) & (y != 1)
        if bool(soft.any()):
            first = int(torch.nonzero(soft)[0][0])
            raise view.error("targets", f"expected targets in {{0, 1}}, got {float(y[first])!r} at index {first}")
    return z, y


def binary_log_probs(view: View, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 − p)) of binary scores [N] in float64, without cancellation.

    Float64 costs nothing on N scalars and makes each element's value
    independent of the vectorized kernel's tail handling, so split batches
    merge to the unsplit value within 1e-9."""
    if kind == "logits":
        z = view.float("logits", dtype=torch.float64)
        return -F.softplus(-z), -F.softplus(z)
    raw = view.scores("logits").to(torch.float64)
    if kind == "probs":
        view.log_space("logits", kind)  # refuses values outside [0, 1]
        return torch.log(raw), torch.log1p(-raw)
    if bool((raw > 0).any()):
        raise view.error("logits", "input_kind='log_probs' expects log-probabilities <= 0, got a positive value")
    return raw, log1mexp(raw)


def log1mexp(lp: torch.Tensor) -> torch.Tensor:
    """log(1 − e^lp) for lp <= 0 (Mächler 2012: two branches, each accurate on its side of −log 2)."""
    near = lp > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(lp)), torch.log1p(-torch.exp(lp)))


def binary_predictions(view: View, z: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Predicted class (bool) of binary scores: logit > threshold, or p > σ(threshold)."""
    threshold, kind = p["threshold"], p["input_kind"]
    if kind == "logits":
        above: torch.Tensor = z.to(torch.float64) > threshold  # never round the threshold to a float16 logit
        return above
    log_threshold = -(max(-threshold, 0.0) + math.log1p(math.exp(-abs(threshold))))  # log σ(threshold) = −softplus(−threshold)
    lp, _ = binary_log_probs(view, kind)
    predicted: torch.Tensor = lp > log_threshold
    return predicted


def multiclass(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, K, d...] as sent, labels [N, d...] with ignored set to 0, valid mask)."""
    z = view.scores("logits")
    if z.ndim == 1:
        raise view.error(
            "logits",
            "logits [N] are binary scores: send their truth as role 'targets' ({0, 1}); labels go with multiclass logits [N, K, ...]",
        )
    z = check_logits(view)
    y, valid = class_labels(view, z, p["ignore_index"])
    return z, y, valid


def truth_and_predictions(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(labels, predictions, valid mask, K) for either layout; binary counts as K = 2."""
    if is_binary(view):
        z, y = binary_inputs(view)
        return y.to(torch.int64), binary_predictions(view, z, p).to(torch.int64), torch.ones_like(y, dtype=torch.bool), 2
    z, y, valid = multiclass(view, p)
    stats = view.row_stats("logits", 1, input_kind=p["input_kind"])
    return y, stats.argmax, valid, z.shape[1]


def diagnose_imbalance(view: View, y: torch.Tensor, valid: torch.Tensor, k: int) -> None:
    """class_imbalance of the labels (multiclass) or targets (binary) these metrics read."""
    view.diagnose_class_imbalance("targets" if is_binary(view) else "labels", y, valid, k)


def nan_average(values: torch.Tensor, weights: torch.Tensor | None) -> float:
    """sklearn's _nanaverage: NaN entries dropped; all-zero weights fall back to a plain mean."""
    keep = ~torch.isnan(values)
    if values.numel() == 0 or not bool(keep.any()):
        return math.nan
    values = values[keep]
    if weights is not None:
        weights = weights[keep]
        if float(weights.sum()) != 0:
            return float((values * weights).sum() / weights.sum())
    return float(values.mean())
