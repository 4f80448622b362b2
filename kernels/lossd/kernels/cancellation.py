"""Cancellation of long evaluations: a token checked between chunks.

The server runs each unit of work under :func:`cancellable` with the call's
token; the kernels' chunk loops call :func:`check_cancelled`, so a call
cancelled by its client or past its deadline stops at the next chunk instead
of computing for nobody. Outside :func:`cancellable` the check costs one
context-variable lookup and never raises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Cancelled", "DeadlineExceeded", "CancelToken", "cancellable", "check_cancelled"]


class Cancelled(RuntimeError):
    """The caller cancelled the evaluation (its client went away)."""


class DeadlineExceeded(Cancelled):
    """The evaluation ran past its caller's deadline."""


class CancelToken:
    """Set by the caller (:meth:`cancel`) or by time (``deadline``, on the time.monotonic() clock)."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop at its next check."""
        self._cancelled.set()

    def check(self) -> None:
        """Raise Cancelled or DeadlineExceeded when the work should stop."""
        if self._cancelled.is_set():
            raise Cancelled("the evaluation was cancelled by its caller")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded("the evaluation ran past its deadline")


_current: ContextVar[CancelToken | None] = ContextVar("lossd_cancel_token", default=None)


@contextmanager
def cancellable(token: CancelToken) -> Iterator[None]:
    """Make ``token`` the one :func:`check_cancelled` consults in this thread for the block."""
    reset = _current.set(token)
    try:
        yield
    finally:
        _current.reset(reset)


def check_cancelled() -> None:
    """Raise if the current work was cancelled or is past its deadline (called between chunks)."""
    token = _current.get()
    if token is not None:
        token.check()
