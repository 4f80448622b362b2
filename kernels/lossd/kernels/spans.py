"""Optional spans around each function's update and finalize, for the server's tracing.

The kernels know nothing of OpenTelemetry: the server installs a span factory
with :func:`set_span_factory` when tracing is on. Without one,
:func:`function_span` returns a shared no-op context manager, so the default
costs one global lookup per function call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

__all__ = ["SpanFactory", "function_span", "set_span_factory"]

# (span name, attributes) -> a context manager that opens the span for the block.
SpanFactory = Callable[[str, Mapping[str, str]], AbstractContextManager[object]]

_factory: SpanFactory | None = None
_NOOP: AbstractContextManager[object] = nullcontext()  # reusable and reentrant


def set_span_factory(factory: SpanFactory | None) -> None:
    """Install (or, with None, remove) the factory that opens the kernels' spans."""
    global _factory
    _factory = factory


def function_span(phase: str, function: str, alias: str) -> AbstractContextManager[object]:
    """A span ``lossd.<phase>`` (update, finalize) for one function, or a no-op without a factory."""
    factory = _factory
    if factory is None:
        return _NOOP
    return factory(f"lossd.{phase}", {"lossd.function": function, "lossd.alias": alias})
