"""Sufficient statistics of one observed evaluation, as plain numbers for counters and history.

Everything exported is a sum, so that Prometheus (over replicas and time
windows) and the in-process history merge them exactly:

- per function alias whose value is an additive mean (a loss, accuracy, the
  LM loss; not ECE, AUROC or perplexity), the numerator and denominator the
  function itself declares (:attr:`lossd.kernels.FunctionResult.numerator`,
  set only for such means; under ``reduction="sum"`` the value is the numerator);
- per batch, the rows and tokens evaluated and the top-1 calibration counters
  (:mod:`lossd.server.monitoring.calibration`), gathered in a :class:`RowSummary`
  that adds up over a stream's messages.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lossd.kernels import Evaluation, State, finalize_states
from lossd.kernels.batch import Batch
from lossd.kernels.prepared import Prepared
from lossd.server.monitoring.calibration import Calibration, calibration_counts_many

__all__ = ["LossSums", "OpenStreams", "RowSummary", "loss_sums", "row_counts", "summarize_batch", "summarize_batches"]

# Streams whose partial sums monitoring keeps at most (a stream whose end was lost is forgotten first).
MAX_OPEN_STREAMS = 4096


@dataclass(frozen=True)
class LossSums:
    """One observation's contribution to each mean, by alias, plus what could not be counted."""

    sums: dict[str, tuple[float, float]]  # alias -> (numerator, denominator)
    skipped: dict[str, str]  # alias -> reason (non_finite, negative)


def _numerators(evaluation: Evaluation) -> dict[str, tuple[float, float]]:
    """Alias -> (numerator, denominator) of every result that declares itself an additive mean."""
    return {
        alias: (r.numerator, float(r.denominator))
        for alias, r in evaluation.results.items()
        if r.numerator is not None and r.denominator is not None
    }


def loss_sums(evaluation: Evaluation, prior_states: Mapping[str, State] | None = None) -> LossSums:
    """Numerators and denominators an evaluation adds, for every result that is an additive mean.

    With ``prior_states`` the evaluation covers them too; their own values are
    finalized (cheap: these are small sums) and subtracted, so a client run
    sending one batch per call is counted once per batch, not once per call.
    """
    current = _numerators(evaluation)
    for alias, state in (prior_states or {}).items():
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


def _role_tensor(batch: Batch, p: Prepared, role: str) -> torch.Tensor | None:
    tensor: torch.Tensor | None = batch.tensors.get(p.inputs.get(role, role))
    return tensor


def row_counts(batch: Batch, prepared: Sequence[Prepared]) -> tuple[int, int]:
    """Count (rows, tokens) of a batch, reading tensors through the functions' role mappings.

    Rows are dim 0 of the first function's ``labels`` (else of the first
    function's first tensor); tokens are the label positions (``labels.numel()``,
    so [B, T] labels give B·T), else rows."""
    for p in prepared:
        labels = _role_tensor(batch, p, "labels") if any(r.name == "labels" for r in p.fdef.roles) else None
        if labels is not None:
            return (int(labels.shape[0]) if labels.ndim else 1), int(labels.numel())
    for p in prepared:
        for role in p.fdef.roles:
            anchor = _role_tensor(batch, p, role.name)
            if anchor is not None:
                rows = int(anchor.shape[0]) if anchor.ndim else 1
                return rows, rows
    return 0, 0


@dataclass(frozen=True)
class RowSummary:
    """Per-row statistics of one or more batches; ``+`` merges two (a stream's messages)."""

    calibration: Calibration | None = None
    rows: int = 0
    tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # calibration skip reason -> batches

    def __add__(self, other: RowSummary) -> RowSummary:
        a, b = self.calibration, other.calibration
        merged = a if b is None else b if a is None else a + b
        return RowSummary(merged, self.rows + other.rows, self.tokens + other.tokens, self.skipped + other.skipped)


def summarize_batch(batch: Batch, prepared: Sequence[Prepared], bins: int) -> RowSummary:
    """The :class:`RowSummary` of one evaluated batch."""
    return summarize_batches([(batch, prepared)], bins)[0]


def summarize_batches(batches: Sequence[tuple[Batch, Sequence[Prepared]]], bins: int) -> list[RowSummary]:
    """:func:`summarize_batch` of each (batch, its functions), computed together (the same numbers, a fraction of the calls)."""
    summaries = []
    for (batch, prepared), counts in zip(batches, calibration_counts_many(batches, bins), strict=True):
        rows, tokens = row_counts(batch, prepared)
        if isinstance(counts, str):
            summaries.append(RowSummary(None, rows, tokens, Counter({counts: 1})))
        else:
            summaries.append(RowSummary(counts, rows, tokens))
    return summaries


class OpenStreams:
    """The summed messages of the streams still open, by call; a stream is exported whole or not at all."""

    def __init__(self, *, on_forgotten: Callable[[], None], max_streams: int = MAX_OPEN_STREAMS) -> None:
        self._sums: dict[int, RowSummary] = {}  # the worker thread's only
        self._incomplete: dict[int, None] = {}  # streams that lost a message to a full queue (an ordered set)
        self._lock = threading.Lock()  # lost_message runs on the event loop
        self._on_forgotten = on_forgotten
        self.max_streams = max_streams

    def __len__(self) -> int:
        return len(self._sums)

    def add(self, call: int, part: RowSummary) -> None:
        """Add one message's summary to its stream."""
        prior = self._sums.pop(call, None)
        self._sums[call] = part if prior is None else prior + part
        while len(self._sums) > self.max_streams:  # streams whose end never came (lost to a full queue)
            del self._sums[next(iter(self._sums))]
            self._on_forgotten()

    def lost_message(self, call: int) -> None:
        """A message of the stream was dropped: its rows and calibration will be skipped."""
        with self._lock:
            self._incomplete[call] = None
            while len(self._incomplete) > self.max_streams:
                del self._incomplete[next(iter(self._incomplete))]

    def finish(self, call: int) -> RowSummary:
        """The stream's summed messages, forgotten here (skipped whole if one was lost)."""
        summary = self._sums.pop(call, RowSummary())
        with self._lock:
            incomplete = call in self._incomplete
            self._incomplete.pop(call, None)
        return RowSummary(skipped=Counter({"queue_full": 1})) if incomplete else summary
