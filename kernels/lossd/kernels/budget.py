"""Memory budget of a request: what each function will allocate, estimated from shapes and parameters before computing.

A function declares ``FunctionDef.memory``: ``(shapes, params) -> Estimate``,
``shapes`` its role -> input shape, ``params`` its resolved parameters. The
estimate counts the intermediates and state it allocates and the tensors its
result returns; functions without a declaration get :func:`chunked`, a small
multiple of their input bytes (their passes walk the inputs a chunk at a
time). :func:`check_budget` sums the estimates of a request's functions and
refuses it, before anything is allocated, with :class:`RequestBudgetExceeded`
naming the setting and the estimate.

The per-cell factors of the known large states were measured: AUROC with
bins=10^6 over K=64 peaked at 4.6 GB (72 bytes a cell), classwise ECE with
1000 bins over K=10^5 at 5.3 GB (53 bytes), moe_load_balancing with top_k=E=8000
at 6.9 GB (108 bytes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from lossd.kernels.chunks import CHUNK_ELEMENTS
from lossd.kernels.errors import RequestBudgetExceeded

__all__ = [
    "Budget",
    "Estimate",
    "MemoryFn",
    "chunked",
    "confusion",
    "rank_histogram",
    "calibration_bins",
    "moe_routing",
    "pairwise",
    "ctc_lattice",
    "check_budget",
    "estimates",
    "Estimated",
    "MEMORY_SETTING",
    "RESPONSE_SETTING",
]

MEMORY_SETTING = "max_request_memory_bytes"
RESPONSE_SETTING = "max_message_bytes"
F64 = 8


class Estimate(NamedTuple):
    """Bytes a function allocates while computing (``memory``) and returns as tensors (``response``)."""

    memory: int
    response: int = 0


Shapes = Mapping[str, tuple[int, ...]]
MemoryFn = Callable[[Shapes, Mapping[str, Any]], Estimate]


def _elements(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _classes(shapes: Shapes, role: str = "logits") -> int:
    """K of a class-scores role: dim 1 of [N, K, ...]; binary [N] scores count as 2 classes."""
    shape = shapes.get(role, ())
    return shape[1] if len(shape) >= 2 else 2


def chunked(shapes: Shapes, params: Mapping[str, Any]) -> Estimate:
    """The default: a float64 copy of the inputs and a few chunk-sized temporaries; per-element values if asked."""
    n = _elements(shapes)
    response = n * F64 if params.get("reduction") == "none" else 0
    return Estimate(n * F64 + 4 * min(n, CHUNK_ELEMENTS) * F64 + response, response)


def confusion(shapes: Shapes, params: Mapping[str, Any], *, returns_matrix: bool = False) -> Estimate:
    """A K×K float64 confusion state (the update's, the merged one, the finalized copy); confusion_matrix returns it."""
    k = _classes(shapes)
    cells = k * k * F64
    response = cells if returns_matrix else k * F64 * 2
    return Estimate(chunked(shapes, params).memory + 3 * cells + response, response)


def rank_histogram(shapes: Shapes, params: Mapping[str, Any]) -> Estimate:
    """AUROC / AP: K×T positive and negative histograms (binned), or a float64 copy of the scores (exact)."""
    k, bins = _classes(shapes), params.get("bins")
    base = chunked(shapes, params).memory
    if bins is None:
        return Estimate(base + 3 * _elements(shapes) * F64, k * F64)
    return Estimate(base + 72 * k * int(bins), k * F64)


def calibration_bins(shapes: Shapes, params: Mapping[str, Any]) -> Estimate:
    """Equal-width bins: B×3 float64, or K×B×3 with scope='classwise'; the reliability diagram returns them."""
    groups = _classes(shapes) if params.get("scope") == "classwise" else 1
    cells = groups * int(params.get("n_bins", 15))
    return Estimate(chunked(shapes, params).memory + 64 * cells, 3 * F64 * cells)


def moe_routing(shapes: Shapes, params: Mapping[str, Any]) -> Estimate:
    """top_k × E routing counts, their bincount and conversions; the state holds them."""
    router = shapes.get("router_logits", ())
    experts = router[-1] if router else 1  # a 0-dim tensor is refused when its view is built, after this estimate
    cells = int(params.get("top_k", 2)) * experts
    return Estimate(chunked(shapes, params).memory + 112 * cells)


def pairwise(shapes: Shapes, params: Mapping[str, Any]) -> Estimate:
    """N×N similarities of in-batch losses (a few float64 matrices of them: logits, masks, exp)."""
    n = max((s[0] for s in shapes.values() if s), default=0)
    return Estimate(chunked(shapes, params).memory + 6 * n * n * F64)


def ctc_lattice(shapes: Shapes, params: Mapping[str, Any]) -> Estimate:
    """The CTC forward lattice: N × T × (2S + 1), kept for the backward-free loss in float64 (and its log-sum-exp temporaries)."""
    log_probs = shapes.get("log_probs", (1, 1, 1))
    t, n = (log_probs[0], log_probs[1]) if len(log_probs) >= 2 else (1, 1)
    targets = shapes.get("targets", (1,))
    s = targets[-1] if len(targets) >= 2 else max(1, targets[0] if targets else 1)
    return Estimate(chunked(shapes, params).memory + 4 * n * t * (2 * s + 1) * F64)


def _megabytes(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def check_budget(estimates: Iterable[tuple[str, Estimate]], *, max_memory_bytes: int | None, max_response_bytes: int | None) -> int:
    """Refuse a request whose summed estimates exceed the budgets, naming the largest contributor; return its memory estimate."""
    items = list(estimates)
    memory = sum(e.memory for _, e in items)
    response = sum(e.response for _, e in items)
    if max_memory_bytes is not None and memory > max_memory_bytes:
        alias, top = max(items, key=lambda item: item[1].memory)
        raise RequestBudgetExceeded(
            f"request needs an estimated {_megabytes(memory)} of memory (largest: {alias}, {_megabytes(top.memory)}), over the "
            f"server's budget of {_megabytes(max_memory_bytes)} ({MEMORY_SETTING}, LOSSD_{MEMORY_SETTING.upper()}); "
            "use fewer classes, bins or functions per request",
            MEMORY_SETTING,
        )
    if max_response_bytes is not None and response > max_response_bytes:
        alias, top = max(items, key=lambda item: item[1].response)
        raise RequestBudgetExceeded(
            f"the response would carry an estimated {_megabytes(response)} of tensors (largest: {alias}, {_megabytes(top.response)}), "
            f"over the largest message of {_megabytes(max_response_bytes)} ({RESPONSE_SETTING}, LOSSD_{RESPONSE_SETTING.upper()}); "
            "ask for fewer tensor results per request",
            RESPONSE_SETTING,
        )
    return memory


class Budget(NamedTuple):
    """The server's limits on one request: estimated memory, and tensor bytes in the response (None: no limit).

    ``reserve``: called with the memory estimate of each unit of work that
    passed, before it allocates; the server's ledger of the work running at
    once (lossd.server.admission.MemoryLedger), which may refuse it in turn."""

    max_memory_bytes: int | None = None
    max_response_bytes: int | None = None
    reserve: Callable[[int], None] | None = None

    def check(self, prepared: Iterable[Any], tensors: Mapping[str, Any]) -> None:
        """Estimate every prepared spec on ``tensors`` (anything with a ``shape``) and refuse the request over the budget."""
        self.checked(estimates(prepared, tensors))

    def checked(self, items: Iterable[tuple[str, Estimate]]) -> None:
        """Refuse estimates ``items`` over the budget, then reserve their memory."""
        memory = check_budget(items, max_memory_bytes=self.max_memory_bytes, max_response_bytes=self.max_response_bytes)
        if self.reserve is not None:
            self.reserve(memory)


class Estimated(NamedTuple):
    """A :class:`Budget` with a request's estimates already made, which :meth:`check` does not make again.

    The server estimates a small request on its wire shapes, before decoding,
    to decide whether it runs on the event loop; the decoded tensors have
    those shapes, so the evaluation checks the same estimates, where it
    always checks its budget."""

    budget: Budget
    items: Sequence[tuple[str, Estimate]]  # estimates(prepared, tensors) of the request's prepared specs

    def check(self, prepared: Iterable[Any], tensors: Mapping[str, Any]) -> None:
        """Refuse the request over the budget, from the estimates given (``prepared`` and ``tensors`` are theirs)."""
        self.budget.checked(self.items)


def estimates(prepared: Iterable[Any], tensors: Mapping[str, Any]) -> list[tuple[str, Estimate]]:
    """(alias, Estimate) of every prepared spec on ``tensors`` (anything with a ``shape``: torch, numpy, lossd.v1 Tensor)."""
    out = []
    for p in prepared:
        shapes: dict[str, tuple[int, ...]] = {}
        for role in p.fdef.roles:
            shape = getattr(tensors.get(p.inputs.get(role.name, role.name)), "shape", None)
            if shape is not None:
                shapes[role.name] = tuple(int(d) for d in shape)
        estimate: MemoryFn = p.fdef.memory or chunked
        out.append((p.alias, estimate(shapes, p.params)))
    return out
