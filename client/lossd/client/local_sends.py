"""``compute="local"``: each update's ``Finalize`` sent in the background, in order, at most one in flight.

A local run computes and merges every batch here, so ``update`` has its
values without the server; the ``Finalize`` that gives the server the same
states (for its monitoring: dashboards see local runs like any other) goes
out while the caller computes its next batch. One send is in flight at a
time: the next ``update`` (and ``merge``, ``result``, ``states``) first waits
for the previous one, so the server gets the batches in order and a failure
is heard by the call that follows it.

A send that fails (after the client's own retries) is raised by that next
call as the error the send got (same class, code and status details), its
message naming the batch it carried (index, request id) and saying that this
batch and later ones were not added: the run goes back to the states the
server last acknowledged, so the caller resends from that batch and nothing
is lost or counted twice.

:class:`ThreadSends` serves :class:`~lossd.client.run.Run`: one worker thread
of a ``ThreadPoolExecutor``, which Python joins at interpreter exit, so the
last batch still reaches the server when a script ends without ``result()``
and ``close()`` on the client waits for its runs' sends before closing the
channel (a failure it finds is logged: no call is left to raise it).
:class:`TaskSends` serves :class:`~lossd.client.run.AsyncRun`: an asyncio
task, which ``await client.close()`` waits for, and an event loop that ends
first cancels.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

from lossd.client.errors import CancelledError, InvalidArgumentError, LossdError, naming_batch
from lossd.client.messages import batch_label

__all__ = ["FailedSend", "ThreadSends", "TaskSends", "StillSending", "log_unheard", "closing_waits_for"]

log = logging.getLogger("lossd.client")

T = TypeVar("T")


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


class ThreadSends:
    """A :class:`~lossd.client.run.Run`'s sends: one worker thread, at most one send in flight."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None  # started with the first send
        self._pending: _Pending[Future[Any]] | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a send was started and not yet waited for."""
        return self._pending is not None

    def send(self, batch: int, request_id: str, call: Callable[[], object]) -> None:
        """Start ``call`` (the Finalize of batch ``batch``) on the worker thread; the previous send must have been waited for."""
        if self._pending is not None:
            raise RuntimeError(f"batch {self._pending.batch}'s Finalize is still in flight: wait() for it first")
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

    def drain(self) -> FailedSend | None:
        """Wait for the send in flight (the client is closing) and say how it failed, leaving it for the run to raise too."""
        pending = self._pending
        if pending is None:
            return None
        error = pending.outcome.exception()
        return None if error is None else FailedSend(pending.batch, pending.request_id, error)


class TaskSends:
    """An :class:`~lossd.client.run.AsyncRun`'s sends: one asyncio task at a time."""

    def __init__(self) -> None:
        self._pending: _Pending[asyncio.Task[Any]] | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a send was started and not yet waited for."""
        return self._pending is not None

    def send(self, batch: int, request_id: str, call: Callable[[], Awaitable[object]]) -> None:
        """Start ``call()`` (the Finalize of batch ``batch``) as a task; the previous send must have been waited for."""
        if self._pending is not None:
            raise RuntimeError(f"batch {self._pending.batch}'s Finalize is still in flight: await wait() first")

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

    async def drain(self) -> FailedSend | None:
        """Wait for the send in flight (the client is closing) and say how it failed, leaving it for the run to raise too."""
        pending = self._pending
        if pending is None:
            return None
        await asyncio.wait([pending.outcome])
        task = pending.outcome
        error = None if task.cancelled() else task.exception()
        return None if error is None else FailedSend(pending.batch, pending.request_id, error)

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


def log_unheard(failed: FailedSend | None) -> None:
    """A send that failed while its client closed: logged, as no later call of its run will be made to raise it."""
    if failed is not None:
        log.warning("closing the client: %s", failed.named_error())


def closing_waits_for(client: object, sends: ThreadSends | TaskSends) -> None:
    """Register ``sends`` with the client (a lossd client has ``core.local_sends``), whose close() waits for them."""
    registry = getattr(getattr(client, "core", None), "local_sends", None)
    if registry is not None:
        registry.add(sends)
