"""``compute="local"``: the runs' ``Finalize`` calls, sent in the background, in order, at most one in flight.

A local run computes and merges every batch here, so ``update`` has its
values without the server; the ``Finalize`` that gives the server the same
states (for its monitoring: dashboards see local runs like any other) goes
out while the caller computes its next batches. Each ``Finalize`` carries the
run's merged states (the run's prior state and the newest batch's), so one
send covers every batch merged since the last: an update whose send would
come under :data:`SEND_INTERVAL` after the last one, or while one is still in
flight, leaves it to a later update. ``merge``, ``result``, ``states``,
``named_states`` and the client's ``close()`` first wait for the send in
flight, then send what is held back and wait for it.

A send that fails (after the client's own retries) is raised by the next call
that waits for it, as the error the send got (same class, code and status
details), its message naming the first batch it carried (index, request id)
and saying that this batch and later ones were not added: the run goes back
to the states the server last acknowledged, so the caller resends from that
batch and nothing is lost or counted twice. A failure found by ``close()`` is
logged: no later call of the run is left to raise it.

:class:`ThreadSends` serves :class:`~lossd.client.run.Run` (one worker thread
of a ``ThreadPoolExecutor``, which Python joins at interpreter exit, so a
send in flight still reaches the server when a script ends without
``result()``; a batch held back reaches it with ``result()`` or ``close()``).
:class:`TaskSends` serves :class:`~lossd.client.run.AsyncRun` (an asyncio
task, which an event loop that ends first cancels).
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import logging
import math
import os
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

from lossd.client.errors import CancelledError, InvalidArgumentError, LossdError, naming_batch
from lossd.client.messages import batch_label

__all__ = [
    "FailedSend",
    "ThreadSends",
    "TaskSends",
    "StillSending",
    "SEND_INTERVAL",
    "closing_waits_for",
    "flushed_at_close",
    "flushed_at_close_async",
]

log = logging.getLogger("lossd.client")

T = TypeVar("T")


# A local run sends a Finalize at most this often (and never two at once). Every Finalize carries
# the run's merged states, so the batches merged here in between reach the server with the next
# one: same totals, a fraction of the calls. A run of 10 ms batches on two cores spent a third of
# its time on per-batch Finalize calls (the server's CPU for each, about 2 ms, competing with the
# client's own compute); the dashboard still sees a local run within this interval of each update.
# 0: a Finalize per batch, each update waiting for the previous one (LOSSD_LOCAL_SEND_INTERVAL).
def _send_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 3600:
        raise ValueError(f"LOSSD_LOCAL_SEND_INTERVAL: expected seconds between 0 and 3600 (0: a Finalize per batch), got {text!r}")
    return value


SEND_INTERVAL = _send_interval(os.environ.get("LOSSD_LOCAL_SEND_INTERVAL", "0.1"))
EXIT_SECONDS = 10.0  # the deadline of a held-back Finalize sent at interpreter exit


class StillSending(ValueError):
    """A synchronous read of an :class:`~lossd.client.run.AsyncRun` while its last batch's ``Finalize`` is in flight."""


@dataclass(frozen=True)
class FailedSend:
    """The ``Finalize`` of batch ``batch`` (from 0) failed, after the client's retries, with ``error``."""

    batch: int
    request_id: str
    error: BaseException

    def raise_named(self) -> NoReturn:
        """Raise :meth:`named_error`, from ``error``."""
        named = self.named_error()
        if named is self.error:
            raise named
        raise named from self.error

    def named_error(self) -> BaseException:
        """``error`` again (same class and details), its message naming the batch and where to resend from."""
        label = batch_label(self.batch, request_id=self.request_id)
        note = f"batch {self.batch} and later were not added; resend from batch {self.batch}"
        exc = self.error
        if isinstance(exc, InvalidArgumentError) and exc.violations:  # each violation names the batch, as a refused batch's do
            return naming_batch(exc, f"{label} (its Finalize was refused): {note}")
        message = f"{exc.message if isinstance(exc, LossdError) else exc}; in {label}, whose Finalize failed: {note}"
        try:
            named = copy.copy(exc)  # the same class and attributes (code, status, reason, setting, ...)
        except Exception:  # an exception that cannot be rebuilt from its args: say it in a note instead
            exc.add_note(message)
            return exc
        if isinstance(named, LossdError):
            named.message = message
            named.args = (f"{named.code.name}: {message}",)
        else:
            named.args = (message,)
        return named


@dataclass
class _Pending(Generic[T]):
    batch: int
    request_id: str
    outcome: T


F = TypeVar("F", Future[Any], asyncio.Task[Any])


class _Sends(Generic[F]):
    """The one send a run may have in flight (a thread's future or a task), until it is waited for."""

    def __init__(self) -> None:
        self._pending: _Pending[F] | None = None

    @property
    def busy(self) -> bool:
        """Whether a send is still on its way (started, not answered)."""
        return self._pending is not None and not self._pending.outcome.done()

    def _check_none_pending(self) -> None:
        if self._pending is not None:
            raise RuntimeError(f"batch {self._pending.batch}'s Finalize is still in flight: wait for it first")


class ThreadSends(_Sends[Future[Any]]):
    """A :class:`~lossd.client.run.Run`'s sends: one worker thread, at most one send in flight."""

    def __init__(self) -> None:
        super().__init__()
        self._executor: ThreadPoolExecutor | None = None  # started with the first send

    def send(self, batch: int, request_id: str, call: Callable[[], object]) -> None:
        """Start ``call`` (the Finalize of batch ``batch``) on the worker thread; the previous send must have been waited for."""
        self._check_none_pending()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lossd-run-send")
        self._pending = _Pending(batch, request_id, self._executor.submit(call))

    def wait(self) -> FailedSend | None:
        """Wait for the send in flight (if any): None when it succeeded (or there was none), else how it failed."""
        pending = self._pending
        if pending is None:
            return None
        error = pending.outcome.exception()  # an interrupt here leaves the send pending, to wait for again
        self._pending = None
        return None if error is None else FailedSend(pending.batch, pending.request_id, error)


class TaskSends(_Sends[asyncio.Task[Any]]):
    """An :class:`~lossd.client.run.AsyncRun`'s sends: one asyncio task at a time."""

    def send(self, batch: int, request_id: str, call: Callable[[], Awaitable[object]]) -> None:
        """Start ``call()`` (the Finalize of batch ``batch``) as a task; the previous send must have been waited for."""
        self._check_none_pending()

        async def sending() -> object:
            return await call()

        self._pending = _Pending(batch, request_id, asyncio.get_running_loop().create_task(sending()))

    async def wait(self) -> FailedSend | None:
        """Wait for the send in flight (if any): None when it succeeded (or there was none), else how it failed."""
        pending = self._pending
        if pending is None:
            return None
        # asyncio.wait never cancels what it waits for: a caller cancelled here leaves the send going, to wait for again.
        await asyncio.wait([pending.outcome])
        return self._take(pending)

    def finished(self, what: str) -> FailedSend | None:
        """Like :meth:`wait` for a send already over; one still in flight raises :class:`StillSending` (``what``: the caller's call)."""
        pending = self._pending
        if pending is None:
            return None
        if not pending.outcome.done():
            raise StillSending(
                f"batch {pending.batch}'s Finalize is still being sent: await run.merge() before {what} "
                "(it waits for the send, and raises its error if it failed)"
            )
        return self._take(pending)

    def _take(self, pending: _Pending[asyncio.Task[Any]]) -> FailedSend | None:
        self._pending = None
        task = pending.outcome
        # A cancelled send is a failed one, raised as lossd's CancelledError: asyncio's would read as the caller's cancellation.
        error = CancelledError("the Finalize was cancelled before the server answered") if task.cancelled() else task.exception()
        return None if error is None else FailedSend(pending.batch, pending.request_id, error)


def closing_waits_for(client: object, run: object, *, at_exit: bool = False) -> None:
    """Register a local ``run`` with its client (a lossd client has ``core.local_runs``), whose close() flushes it first.

    ``at_exit`` (a blocking run): what it holds back is also sent at interpreter exit (:func:`sent_at_exit`)."""
    registry = getattr(getattr(client, "core", None), "local_runs", None)
    if registry is not None:
        registry.add(run)
    if at_exit:
        sent_at_exit(run)


def flushed_at_close(run: Any) -> None:
    """``run.flush()`` as its client closes; a failed send is logged, since no later call of the run will raise it."""
    try:
        run.flush()
    except Exception as exc:
        log.warning("closing the client: %s", exc)


async def flushed_at_close_async(run: Any) -> None:
    """:func:`flushed_at_close` for an AsyncRun."""
    try:
        await run.flush()
    except Exception as exc:
        log.warning("closing the client: %s", exc)


# Runs (blocking ones) whose held-back batches are sent when the interpreter exits.
_RUNS_AT_EXIT: weakref.WeakSet[Any] = weakref.WeakSet()


def sent_at_exit(run: Any) -> None:
    """Have ``run.send_held_now()`` called at interpreter exit (a script that ends without ``result()``)."""
    _RUNS_AT_EXIT.add(run)


@atexit.register
def _send_held_at_exit() -> None:
    # By now Python has joined the send threads (a send in flight is done); what a run held back
    # goes out here, in this thread, before grpc's own exit handlers (registered earlier) run.
    for run in list(_RUNS_AT_EXIT):
        try:
            run.send_held_now()
        except Exception as exc:
            log.warning("at exit: %s", exc)
