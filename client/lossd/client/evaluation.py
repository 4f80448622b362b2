"""What an evaluation returns, as Python objects: results by alias, diagnostics, states.

An :class:`EvaluationResult` wraps the ``EvaluateResponse`` it came from, so
``to_json()`` is exactly what ``lossd eval --json`` prints.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any

import numpy as np

from lossd.client.codec import decode_tensor
from lossd.client.diagnostics import Diagnostic, merge_diagnostics
from lossd.client.results import response_to_json
from lossd.v1 import lossd_pb2 as pb

__all__ = ["Diagnostic", "FunctionResult", "EvaluationResult", "merge_diagnostics"]


class FunctionResult:
    """The values of one function: ``value`` (primary), ``values``, ``tensors``, ``denominator``, ``state``."""

    def __init__(self, message: pb.FunctionResult) -> None:
        self.message = message
        self.alias = message.alias
        self.function = message.function
        self.values: dict[str, float] = dict(message.values)
        self.denominator: float | None = message.denominator if message.HasField("denominator") else None
        self.denominator_kind = message.denominator_kind

    @property
    def value(self) -> float:
        """The primary output."""
        if "value" not in self.values:
            kind = "a tensor (see .tensors['value'])" if "value" in self.message.tensors else "no primary output"
            raise ValueError(f"{self.alias}: expected a scalar 'value', but {self.function} returned {kind}")
        return self.values["value"]

    @cached_property
    def tensors(self) -> dict[str, np.ndarray]:
        """Tensor outputs (float64), read-only views of the response bytes."""
        return {name: decode_tensor(t, name) for name, t in self.message.tensors.items()}

    @property
    def state(self) -> pb.State | None:
        """The mergeable state behind the values, when ``return_state`` was asked for."""
        return self.message.state if self.message.HasField("state") else None

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={v:.6g}" for k, v in self.values.items())
        tensors = ", ".join(f"{k}{list(t.shape)}" for k, t in self.message.tensors.items())
        return f"FunctionResult({self.alias!r}, {self.function}: {', '.join(x for x in (values, tensors) if x)})"


class EvaluationResult(Mapping[str, FunctionResult]):
    """Results by alias (in request order) with the diagnostics of the request, stream or run.

    ``result["cross_entropy"].value``; ``result.to_json()`` is the object ``lossd eval --json`` prints.
    """

    def __init__(self, response: pb.EvaluateResponse, diagnostics: list[Diagnostic] | None = None) -> None:
        if diagnostics is not None and diagnostics != [Diagnostic.from_proto(d) for d in response.diagnostics]:
            # a run's diagnostics, accumulated over its batches, replace the last batch's
            copy = pb.EvaluateResponse()
            copy.CopyFrom(response)
            del copy.diagnostics[:]
            copy.diagnostics.extend(d.to_proto() for d in diagnostics)
            response = copy
        self.response = response
        self.results: dict[str, FunctionResult] = {r.alias: FunctionResult(r) for r in response.results}
        self.diagnostics: list[Diagnostic] = [Diagnostic.from_proto(d) for d in response.diagnostics]

    def __getitem__(self, alias: str) -> FunctionResult:
        try:
            return self.results[alias]
        except KeyError:
            raise KeyError(f"no result with alias {alias!r}; the results are {list(self.results)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    @property
    def request_id(self) -> str:
        return self.response.request_id

    @property
    def batches(self) -> int:
        """Batches behind these values (streams and runs count them all)."""
        return self.response.batches

    @property
    def timing(self) -> pb.Timing:
        return self.response.timing

    def states(self) -> dict[str, pb.State]:
        """Alias -> state, for the results that carry one (``return_state=True``)."""
        return {alias: r.state for alias, r in self.results.items() if r.state is not None}

    def to_json(self) -> dict[str, Any]:
        """``{"results": {ALIAS: NUMBER or {...}}, "diagnostics": [...]}``, as ``lossd eval --json`` prints."""
        return response_to_json(self.response)

    def __repr__(self) -> str:
        return f"EvaluationResult({list(self.results.values())!r}, diagnostics={len(self.diagnostics)})"
