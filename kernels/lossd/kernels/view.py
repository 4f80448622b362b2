"""Input validation: a function's window on a batch, with its roles resolved to checked tensors.

A :class:`View` maps a function's roles to the request's tensor names, hands
out each tensor in the form the function needs (floating point in the compute
dtype, int64 class indices, 0/1 targets, log-space scores), refuses what does
not fit with an error naming the tensor or parameter and what was expected,
and raises the input diagnostics on the way (:mod:`lossd.kernels.input_diagnostics`).
:class:`RoleTensors` is the part that names and fetches tensors; :class:`View`
adds the checks of labels, targets, scores and weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lossd.kernels.batch import Batch
from lossd.kernels.dtypes import FLOAT_DTYPES, INT_DTYPES, as_dtype, compute_dtype
from lossd.kernels.errors import InvalidInput
from lossd.kernels.input_diagnostics import defer_nonfinite, diagnose_class_imbalance, diagnose_nonfinite, diagnose_score_kind
from lossd.kernels.row_stats import RowStats

__all__ = ["RoleTensors", "View", "first_index"]


def first_index(mask: torch.Tensor) -> int:
    """The flat (row-major) index of the first True element of ``mask``: where an error points."""
    return int(torch.nonzero(mask.reshape(-1))[0][0])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class RoleTensors:
    """Roles resolved to the request's tensors, and the error paths that name them."""

    batch: Batch
    function: str  # the function's name, for messages
    role_shapes: Mapping[str, str]  # role -> its declared shape, for "missing role" errors
    index: int  # position in the request's function list, for error paths
    alias: str
    inputs: dict[str, str]  # role -> tensor name (explicit mappings; the default is the role's own name)

    # -- naming ------------------------------------------------------------
    def tensor_name(self, role: str) -> str:
        """The request's name for the tensor of ``role``."""
        return self.inputs.get(role, role)

    def field(self, role: str) -> str:
        """The error path of a role's tensor, e.g. ``tensors.student_logits``."""
        return f"tensors.{self.tensor_name(role)}"

    def param_field(self, name: str) -> str:
        """The error path of one of the function's parameters."""
        return f"functions[{self.index}].params.{name}"

    def error(self, role: str, description: str) -> InvalidInput:
        """An INVALID_ARGUMENT naming the role's tensor."""
        return InvalidInput.single(self.field(role), f"{self.function}: {description}")

    def param_error(self, name: str, description: str, *, index: int | None = None) -> InvalidInput:
        """An INVALID_ARGUMENT naming one of the function's parameters (``index``: one element of a list parameter)."""
        field = self.param_field(name) if index is None else f"{self.param_field(name)}[{index}]"
        return InvalidInput.single(field, f"{self.function}: {description}")

    def diag(self, code: str, message: str, *, severity: str | None = None, count: int = 1) -> None:
        """Add a diagnostic raised by this function."""
        self.batch.diagnostics.add(code, message, function=self.alias, severity=severity, count=count)

    # -- tensors -----------------------------------------------------------
    def has(self, role: str) -> bool:
        """Whether the request sent a tensor for ``role``."""
        return self.tensor_name(role) in self.batch.tensors

    def tensor(self, role: str) -> torch.Tensor:
        """The role's tensor as sent (dtype unchanged), on the compute device."""
        t = self._sent(role)
        diagnose_nonfinite(self.batch, self.tensor_name(role), t)
        return t

    def _sent(self, role: str) -> torch.Tensor:
        name = self.tensor_name(role)
        t = self.batch.tensors.get(name)
        if t is None:
            raise InvalidInput.single(
                self.field(role),
                f"{self.function} needs role {role!r} ({self.role_shapes.get(role, '?')}); no tensor named {name!r} was sent"
                + (f" (map it with inputs: {{{role!r}: TENSOR_NAME}})" if role not in self.inputs else ""),
            )
        return t

    def optional(self, role: str) -> torch.Tensor | None:
        """The role's tensor, or None when it was not sent."""
        return self.tensor(role) if self.has(role) else None

    def float(self, role: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The role's tensor in its compute dtype (fp32, or fp64 for fp64 inputs)."""
        t = self.tensor(role)
        if t.dtype not in FLOAT_DTYPES:
            if t.dtype in INT_DTYPES or t.dtype == torch.bool:
                return t.to(dtype or torch.float32)
            raise self.error(role, f"expected a floating-point tensor, got {_dtype_name(t.dtype)}")
        return t.to(dtype or compute_dtype(t.dtype))

    def numeric(self, role: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Like :meth:`float` (integers accepted), but a bool tensor is refused.

        Regression targets or variances may be integer counts, but a bool
        tensor there is almost always a mask sent by mistake; 0/1 values are
        meant only if the caller says so by casting them."""
        t = self.tensor(role)
        if t.dtype == torch.bool:
            raise self.error(role, "expected a floating-point (or integer) tensor, got bool; cast it to float if 0/1 values are meant")
        return self.float(role, dtype=dtype)

    def scores(self, role: str) -> torch.Tensor:
        """A floating-point score tensor (logits, probabilities...) as sent; integer dtypes refused.

        Its nan_or_inf check is deferred (:func:`lossd.kernels.input_diagnostics.defer_nonfinite`):
        the row statistics of scores usually prove them finite without a pass of its own."""
        t = self._sent(role)
        defer_nonfinite(self.batch, self.tensor_name(role), t)
        if t.dtype not in FLOAT_DTYPES:
            raise self.error(role, f"expected a floating-point tensor (float32, float16, bfloat16 or float64), got {_dtype_name(t.dtype)}")
        return t

    def expect_ndim(self, role: str, t: torch.Tensor, allowed: tuple[int, ...] | range, shape_text: str) -> None:
        """Refuse a tensor whose number of dimensions is not one of ``allowed``."""
        if t.ndim not in allowed:
            raise self.error(role, f"expected shape {shape_text}, got {list(t.shape)}")

    def expect_shape(self, role: str, t: torch.Tensor, shape: tuple[int, ...] | torch.Size, text: str) -> None:
        """Refuse a tensor whose shape is not ``shape``."""
        if tuple(t.shape) != tuple(shape):
            raise self.error(role, f"expected shape {list(shape)} ({text}), got {list(t.shape)}")


class View(RoleTensors):
    """A function's window on a :class:`Batch`: labels, targets, scores and weights, checked."""

    def index_labels(self, role: str) -> torch.Tensor:
        """Integer class labels as int64. Floats holding integers are cast; anything else is refused."""
        t = self.tensor(role)
        if t.dtype in INT_DTYPES:
            return as_dtype(t, torch.int64)
        if t.dtype == torch.bool:
            raise self.error(role, "expected integer class indices, got bool; send 0/1 as an integer dtype")
        if t.dtype in FLOAT_DTYPES:
            ok = torch.isfinite(t) & (t == torch.round(t))
            if not bool(ok.all()):
                first = first_index(~ok)
                raise self.error(
                    role, f"expected integer class indices, got non-integer value {float(t.reshape(-1)[first])!r} at flat index {first}"
                )
            # A float past int64's range would cast to an arbitrary integer (-2^63 here), which the range check would quote.
            huge = t.abs() >= 2.0**62
            if bool(huge.any()):
                first = first_index(huge)
                raise self.error(role, f"expected class indices, got {float(t.reshape(-1)[first])!r} at flat index {first}")
            return t.to(torch.int64)
        raise self.error(role, f"expected integer class indices, got {t.dtype}")

    def check_labels(self, role: str, labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
        """Refuse labels outside [0, K) that are not ``ignore_index``; return the valid mask."""
        return self.label_mask(role, labels, num_classes, ignore_index)[0]

    def label_mask(self, role: str, labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> tuple[torch.Tensor, bool]:
        """(valid mask, whether every label is valid), as :meth:`check_labels` checks them."""
        if labels.numel():
            # One reduction proves the common case, every label in [0, K), where the masks
            # below cost seven ops, which a small request pays in full.
            low, high = (int(v) for v in torch.aminmax(labels))
            if low >= 0 and high < num_classes:
                if ignore_index is None or not low <= ignore_index <= high:
                    return torch.ones_like(labels, dtype=torch.bool), True
                return labels != ignore_index, False
        valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = first_index(bad)
            value = int(labels.reshape(-1)[first])
            self.diag(
                "labels_out_of_range",
                f"tensor {self.tensor_name(role)!r} holds label {value} at flat index {first}, outside [0, {num_classes}) and not "
                f"ignore_index={ignore_index}; fix the labels, the number of classes or ignore_index",
            )
            raise self.error(
                role,
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; got {value} at flat index {first} "
                f"({int(bad.sum())} out-of-range labels in all)",
            )
        return valid, False

    def binary_targets(self, role: str) -> torch.Tensor:
        """Targets in [0, 1] as floats (soft targets allowed); anything outside is refused."""
        t = self.tensor(role)
        t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        bad = ~((t >= 0) & (t <= 1))
        if bool(bad.any()):
            first = first_index(bad)
            raise self.error(role, f"expected targets in [0, 1], got {float(t.reshape(-1)[first])!r} at flat index {first}")
        if bool(((t == 0) | (t == 1)).all()):  # hard targets: judge the class balance (soft ones have none)
            self.diagnose_class_imbalance(role, t.to(torch.int64), torch.ones_like(t, dtype=torch.bool), 2)
        return t

    def diagnose_class_imbalance(self, role: str, labels: torch.Tensor, valid: torch.Tensor, k: int) -> None:
        """class_imbalance of the role's labels (see :func:`lossd.kernels.input_diagnostics.diagnose_class_imbalance`)."""
        diagnose_class_imbalance(self.batch, self.tensor_name(role), labels, valid, k)

    def log_space(self, role: str, input_kind: str) -> str:
        """Name of a tensor holding the role's scores in log space (logits or log-probabilities).

        ``probs`` inputs are refused outside [0, 1] and taken to log space once
        per request (memoized), so functions only ever handle log-space scores."""
        name = self.tensor_name(role)
        t = self.scores(role)
        if input_kind != "probs":
            return name
        derived = f"log({name})"
        if derived not in self.batch.tensors:
            bad = ~((t >= 0) & (t <= 1))
            if bool(bad.any()):
                first = first_index(bad)
                raise self.error(
                    role, f"input_kind='probs' expects probabilities in [0, 1], got {float(t.reshape(-1)[first])!r} at flat index {first}"
                )
            # log(0) = -inf is a legitimate score: no nan_or_inf for the derived tensor.
            self.batch.add_tensor(derived, torch.log(t.to(compute_dtype(t.dtype))), finite_checked=True)
        return derived

    def log_scores(self, role: str, input_kind: str) -> torch.Tensor:
        """The role's scores in log space (see :meth:`log_space`), as a tensor."""
        name = self.log_space(role, input_kind)  # may add the derived tensor: look it up afterwards
        return self.batch.tensors[name]

    def row_stats(self, role: str, class_dim: int, *, input_kind: str = "logits", with_entropy: bool = False) -> RowStats:
        """Per-row logsumexp / max / argmax / sum of the role's log-space scores, shared by all functions."""
        name = self.log_space(role, input_kind)
        first = self.batch.memoized_row_stats(name, class_dim) is None
        stats = self.batch.row_stats(name, class_dim, with_entropy=with_entropy)
        if first and input_kind == "logits":
            diagnose_score_kind(self.batch, self.tensor_name(role), self.tensor(role), stats, class_dim, self.alias)
        if first and input_kind in ("probs", "log_probs"):
            self._check_normalized(role, stats, input_kind)
        return stats

    def _check_normalized(self, role: str, stats: RowStats, input_kind: str) -> None:
        """Probabilities (or log-probabilities) must be distributions: rows summing to 1.

        Rows off by more than 1e-3 are refused, so that a value is never computed
        from something other than what the caller meant; rows within it are
        renormalized by every function (log-space scores minus lse, or p / Σp
        where calibration bins probabilities as given). lse = log Σ_k p_k here."""
        off = (stats.lse.abs() > 1e-3) & torch.isfinite(stats.lse)
        if bool(off.any()):
            first = first_index(off)
            total = float(torch.exp(stats.lse.reshape(-1)[first]))
            raise self.error(
                role,
                f"input_kind={input_kind!r} expects rows that are distributions over classes (summing to 1 within 1e-3); "
                f"row {first} sums to {total:.6g}",
            )

    def sample_weights(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """The optional ``weights`` role, broadcast over trailing dims to ``shape``.

        Weights of shape [N] weight whole rows of [N, d1, ...] elements; the
        shape must match ``shape``'s leading dimensions exactly."""
        if not self.has("weights"):
            return None
        w = self.float("weights").to(dtype)
        if tuple(w.shape) != tuple(shape[: w.ndim]):
            raise self.error("weights", f"expected shape {list(shape)} or a prefix of it, got {list(w.shape)}")
        if bool((w < 0).any()):
            raise self.error("weights", "expected non-negative weights")
        return w.reshape(tuple(w.shape) + (1,) * (len(shape) - w.ndim)).expand(shape)
