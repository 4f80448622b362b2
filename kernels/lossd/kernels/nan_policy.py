"""What a request's ``nan_policy`` does with NaN and infinite values in the tensors its functions read.

- ``propagate`` (the default): values are computed as they come, so a NaN
  makes the affected values NaN, and the ``nan_or_inf`` diagnostic says so.
- ``raise``: the request is refused (INVALID_ARGUMENT) naming the first tensor
  holding a non-finite value and its first bad flat index (and row).
- ``omit``: the rows (dim 0, the batch dim) holding a non-finite value in any
  role tensor a function reads are dropped from that function's numerator and
  denominator alike, and the ``rows_omitted`` diagnostic counts them.  Every
  function then runs unchanged on a filtered batch: the same rows of each of
  its role tensors.  Functions without such rows (ctc's [T, N, C], nt_xent's
  two views, uncertainty_weighting's task vector) and ``reduction='none'``
  (whose per-element values would no longer line up with the rows sent)
  refuse ``omit``; so does a non-finite value in a tensor shared by every row
  (class weights, retrieval keys), which no row can be dropped for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from lossd.kernels.batch import Batch
from lossd.kernels.diagnostics import Diagnostic
from lossd.kernels.dtypes import FLOAT_DTYPES
from lossd.kernels.errors import FieldViolation, InvalidInput
from lossd.kernels.input_diagnostics import count_nonfinite, diagnose_nonfinite
from lossd.kernels.prepared import Prepared

__all__ = ["NAN_POLICIES", "DEFAULT_NAN_POLICY", "check_nan_policy", "check_omit", "first_nonfinite", "function_batches"]

NAN_POLICIES = ("propagate", "raise", "omit")
# As in scipy.stats (where the name and the three values come from) and in torch itself:
# values computed as they come, never a request refused or data dropped unless asked.
DEFAULT_NAN_POLICY = "propagate"
FIELD = "nan_policy"


def check_nan_policy(policy: str) -> str:
    """The policy itself, or INVALID_ARGUMENT on ``nan_policy`` for anything but the three names."""
    if policy not in NAN_POLICIES:
        raise InvalidInput.single(FIELD, f"expected one of {', '.join(NAN_POLICIES)}, got {policy!r}")
    return policy


def check_omit(prepared: Sequence[Prepared], policy: str) -> None:
    """Refuse ``omit`` for functions that have no rows to drop, or whose per-element values would lose their rows."""
    if policy != "omit":
        return
    violations = []
    for p in prepared:
        if not p.fdef.example.rows:
            violations.append(
                FieldViolation(
                    FIELD,
                    f"functions[{p.index}] ({p.fdef.name}): nan_policy='omit' drops rows (dim 0 of every role tensor), but "
                    f"{p.fdef.name}'s roles share no row dim ({', '.join(f'{r.name} {r.shape}' for r in p.fdef.roles)}); "
                    "use nan_policy='raise' or 'propagate'",
                )
            )
        elif p.fdef.has_reduction and p.params.get("reduction") == "none":
            violations.append(
                FieldViolation(
                    FIELD,
                    f"functions[{p.index}] ({p.fdef.name}): nan_policy='omit' drops rows, so reduction='none' values would "
                    "no longer line up with the rows sent; use reduction 'mean' or 'sum', or nan_policy='propagate'",
                )
            )
    if violations:
        raise InvalidInput(violations)


class _Finiteness:
    """Whether each tensor of a batch holds a non-finite value, judged once per tensor (fast path: one sum per block)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self._bad: dict[str, bool] = {}

    def has_nonfinite(self, name: str) -> bool:
        bad = self._bad.get(name)
        if bad is None:
            t = self.batch.tensors[name]
            bad = self._bad[name] = t.dtype in FLOAT_DTYPES and t.numel() > 0 and count_nonfinite(t)[0] > 0
        return bad

    def error(self, name: str, why: str) -> InvalidInput:
        """INVALID_ARGUMENT on ``tensors.NAME``: what it holds at its first non-finite flat index (and row)."""
        t = self.batch.tensors[name]
        diagnose_nonfinite(self.batch, name, t)  # the diagnostic rides along with the error
        flat = t.reshape(-1)
        index = int(torch.nonzero(~torch.isfinite(flat))[0][0])
        value = float(flat[index])
        what = "NaN" if value != value else ("inf" if value > 0 else "-inf")
        row = f" (row {index // max(1, t.numel() // t.shape[0])})" if t.ndim >= 1 and t.shape[0] else ""
        return InvalidInput.single(f"tensors.{name}", f"holds {what} at flat index {index}{row}; {why}")


def _role_tensors(p: Prepared, batch: Batch) -> tuple[list[str], list[str]]:
    """(row tensor names, shared tensor names) among the tensors the request sent for ``p``'s roles, in role order."""
    rows: list[str] = []
    shared: list[str] = []
    for role in p.fdef.roles:
        name = p.inputs.get(role.name, role.name)
        if name in batch.tensors and name not in rows and name not in shared:
            (shared if role.name in p.fdef.example.shared else rows).append(name)
    return rows, shared


def function_batches(batch: Batch, prepared: Sequence[Prepared], policy: str) -> Mapping[int, Batch]:
    """The batch each function (by ``Prepared.index``) computes on, under ``policy``.

    ``propagate``: the request's batch for all.  ``raise``: the same, once no
    tensor a function reads holds a non-finite value.  ``omit``: the request's
    batch where a function's tensors are finite, else a filtered batch of its
    finite rows (shared by the functions reading the same tensors, so their
    row statistics are still computed once)."""
    if policy == "propagate":
        return {p.index: batch for p in prepared}
    finite = _Finiteness(batch)
    if policy == "raise":
        why = "nan_policy='raise' refuses NaN and infinite values (nan_policy='omit' drops such rows, 'propagate' computes NaN values)"
        for p in prepared:
            rows, shared = _role_tensors(p, batch)
            for name in rows + shared:
                if finite.has_nonfinite(name):
                    raise finite.error(name, why)
        return {p.index: batch for p in prepared}
    out: dict[int, Batch] = {}
    filtered: dict[tuple[str, ...], tuple[Batch, str]] = {}  # tensors read -> (their finite rows, what was dropped)
    for p in prepared:
        rows, shared = _role_tensors(p, batch)
        for name in shared:
            if finite.has_nonfinite(name):
                raise finite.error(name, f"nan_policy='omit' cannot drop rows for it: {p.fdef.name} applies it to every row")
        bad = [name for name in rows if finite.has_nonfinite(name)]
        if not bad:
            out[p.index] = batch
            continue
        key = tuple(rows + shared)
        if key not in filtered:
            filtered[key] = _omit_rows(batch, p, rows, shared, bad)
        out[p.index], message = filtered[key]
        batch.diagnostics.add("rows_omitted", message, function=p.alias)
    return out


def _omit_rows(batch: Batch, p: Prepared, rows: list[str], shared: list[str], bad: list[str]) -> tuple[Batch, str]:
    """A batch of ``rows``' tensors without the rows where any of ``bad`` is non-finite (``shared`` ones whole)."""
    n = _row_count(batch, p, rows)
    keep = torch.ones(n, dtype=torch.bool, device=batch.device)
    for name in bad:
        keep &= torch.isfinite(batch.tensors[name]).reshape(n, -1).all(dim=1)
    index = torch.nonzero(keep).reshape(-1)
    dropped = n - int(index.numel())
    message = (
        f"nan_policy='omit' dropped {dropped} of {n} rows holding NaN or infinite values in {', '.join(repr(b) for b in bad)} "
        "from the numerator and the denominator"
    )
    tensors = {name: batch.tensors[name].index_select(0, index) for name in rows}
    tensors.update({name: batch.tensors[name] for name in shared})
    filtered = Batch(tensors, batch.device, diagnostics=batch.diagnostics, settings=batch.settings, entropy_for=batch.entropy_for)
    return filtered, message


def _row_count(batch: Batch, p: Prepared, rows: list[str]) -> int:
    """The rows (dim 0) every row tensor of ``p`` shares; INVALID_ARGUMENT on the first that does not."""
    first = batch.tensors[rows[0]]
    n = int(first.shape[0]) if first.ndim else -1
    for name in rows:
        t = batch.tensors[name]
        if t.ndim == 0 or int(t.shape[0]) != n:
            raise InvalidInput.single(
                f"tensors.{name}",
                f"{p.fdef.name}: nan_policy='omit' drops rows along dim 0, so every tensor it reads needs the same dim 0 "
                f"({rows[0]!r} has {list(first.shape)}), got {list(t.shape)}",
            )
    return n


def first_nonfinite(diagnostics: Iterable[Diagnostic], index: int, batch_id: str = "", request_id: str = "") -> str | None:
    """The first_nonfinite_batch message for batch ``index`` (from 0) when its diagnostics say it held NaN or inf, else None.

    A whole run or stream turning NaN from one batch on is traced to that batch:
    by its index, its batch id and the request id that carried it."""
    for d in diagnostics:
        if d.code in ("nan_or_inf", "rows_omitted"):
            where = ", ".join(f"{k} {v!r}" for k, v in (("batch_id", batch_id), ("request id", request_id)) if v)
            return f"batch {index}{f' ({where})' if where else ''} first brought NaN or infinite values: {d.message}"
    return None
