"""Shared memory for co-located clients: a batch's tensors in a POSIX segment, only its name on the wire.

``Client(address, shared_memory=True)`` (and ``AsyncClient``) writes each
large batch of ``evaluate`` into a segment of ``/dev/shm`` and sends, per
tensor, the segment's name, offset, dtype and shape (``Tensor.shared_memory``);
the server maps the segment read-only and computes on it, no copy of the
tensors through gRPC. The server must allow it (``LOSSD_ALLOW_SHARED_MEMORY=true``)
and run on this host as the same user.

Falling back to the wire, with the reason logged once (logger ``lossd.client``):
the address is not on this host (not loopback or a unix socket), or the server
refuses (its field violation names ``allow_shared_memory``); the refused
request is sent again over the wire, and so are the client's later ones.
Batches under :data:`MIN_SHARED_BYTES` always go over the wire (a segment
costs more system calls than they take to copy).

Ownership and cleanup:

- The client owns every segment, named ``lossd_<pid>_<random>`` and created
  exclusively with mode 0600 (never readable by other users). A client keeps
  a small pool of them (:class:`SegmentPool`: at most :data:`POOL_SEGMENTS`
  idle segments and :data:`POOL_BYTES` idle bytes) so that a batch is copied
  into pages already there instead of faulting in a fresh segment per call.
  ``Client.close()`` (``AsyncClient.close()``) unlinks them; a segment whose
  call failed (the server crashing mid-request included) is unlinked at once.
- A segment is written only while this client holds an exclusive ``flock`` on
  it, and the server holds a shared ``flock`` for as long as the request's
  tensors live (the evaluation, and the monitoring work queued after the
  response): so a pooled segment is reused only once the response is back
  *and* the server has let go of it; one still held is skipped, never
  overwritten (another segment serves that call).
- A finalizer (run by ``atexit`` too) unlinks a segment the code did not
  close, in the process that created it only (a forked child never unlinks its
  parent's segments, nor writes to them). A client killed outright
  (``kill -9``) cannot: its segments are unlinked by the next
  ``shared_memory=True`` client of the same user on this host, which sweeps
  the ``lossd_<pid>_*`` segments whose process is gone (a segment survives
  until then, and a recycled pid keeps its segments until that process ends too).
- The server never creates or unlinks a segment (:mod:`lossd.server.shared_memory`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lossd.client.codec import dtype_of
from lossd.client.errors import InvalidArgumentError
from lossd.client.messages import batch_bytes, tags_proto
from lossd.client.settings import is_loopback
from lossd.v1 import lossd_pb2 as pb

__all__ = [
    "MIN_SHARED_BYTES",
    "SEGMENT_DIRECTORY",
    "SegmentPool",
    "SharedBatch",
    "refusal_reason",
    "sweep_stale_segments",
]

log = logging.getLogger("lossd.client")

SEGMENT_DIRECTORY = Path("/dev/shm")
PREFIX = "lossd_"
MIN_SHARED_BYTES = 64 * 1024
# Idle segments a client keeps for reuse. A server holds each segment until its monitoring has read
# the batch (after the response), and under a steady loop of 16 MB calls on two cores that backlog
# reached 8-9 segments: a pool of 4 then unlinked and created a segment (4,100 fresh pages) every third call.
POOL_SEGMENTS = 16
POOL_BYTES = 1 << 30  # idle bytes a client keeps for reuse (tmpfs pages are memory)
_ALIGN = 64  # each tensor starts on a cache line
_OWN_SEGMENT = re.compile(r"lossd_(\d+)_[0-9a-f]{32}")


def refusal_reason(exc: InvalidArgumentError) -> str | None:
    """The server's reason when it refused shared memory (None for any other invalid argument)."""
    for v in exc.violations:
        if v.field.endswith(".shared_memory") and "allow_shared_memory" in v.description:
            return v.description
    return None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep_stale_segments(directory: Path = SEGMENT_DIRECTORY) -> list[str]:
    """Unlink this user's ``lossd_<pid>_*`` segments whose process is gone (a client killed mid-request); returns their names."""
    removed: list[str] = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = _OWN_SEGMENT.fullmatch(entry.name)
        if match is None:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            _unlink(entry.path)
            removed.append(entry.name)
        except OSError:  # alive but not ours to signal, or already gone from the directory
            continue
    return removed


def _release(path: str, fd: int, owner: int) -> None:
    """Close the descriptor and, in the process that created the segment only, unlink it."""
    with contextlib.suppress(OSError):
        os.close(fd)
    if os.getpid() == owner:
        _unlink(path)


class Segment:
    """One segment this process created: its descriptor (which carries the write lock), its writable mapping."""

    def __init__(self, size: int) -> None:
        self.name = f"{PREFIX}{os.getpid()}_{uuid.uuid4().hex}"
        self.path = str(SEGMENT_DIRECTORY / self.name)
        self.size = max(size, 1)
        self.owner = os.getpid()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._finalizer = weakref.finalize(self, _release, self.path, self.fd, self.owner)  # even if close() is never called
        try:
            os.fchmod(self.fd, 0o600)  # whatever the umask
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            self._finalizer()
            raise

    def lock(self) -> bool:
        """Take the exclusive write lock; False while a server still holds its shared lock (it still reads the segment)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        """Let the server take its shared lock (done before the request is sent)."""
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Unmap, close and unlink (idempotent)."""
        if not self.map.closed:
            self.map.close()
        self._finalizer()


class SegmentPool:
    """A client's idle segments, reused for later batches: bounded, thread-safe, emptied by ``close()``.

    A segment leaves the pool only under its exclusive lock, so never while a
    server still reads it; one that cannot be locked stays for a later call.
    """

    def __init__(self, max_segments: int = POOL_SEGMENTS, max_bytes: int = POOL_BYTES) -> None:
        self.max_segments, self.max_bytes = max_segments, max_bytes
        self._idle: list[Segment] = []  # least recently used first
        self._mutex = threading.Lock()
        self._owner = os.getpid()
        self._closed = False

    def acquire(self, size: int) -> Segment:
        """A locked segment of at least ``size`` bytes: an idle one if one is free, else a new one."""
        with self._mutex:
            if os.getpid() == self._owner:  # a forked child never writes to its parent's segments
                for segment in sorted(self._idle, key=lambda s: s.size):
                    if segment.size >= size and segment.lock():
                        self._idle.remove(segment)
                        return segment
        segment = Segment(-(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        segment.lock()
        return segment

    def release(self, segment: Segment, *, reusable: bool) -> None:
        """Back to the pool after its call (``reusable``: the call completed), or unlinked."""
        with self._mutex:
            keep = reusable and not self._closed and os.getpid() == self._owner == segment.owner
            if keep:
                self._idle.append(segment)
            evicted = [] if keep else [segment]
            while len(self._idle) > self.max_segments or sum(s.size for s in self._idle) > self.max_bytes:
                evicted.append(self._idle.pop(0))
        for old in evicted:
            old.close()

    def idle_names(self) -> list[str]:
        """The names of the idle segments (for tests and diagnostics)."""
        with self._mutex:
            return [s.name for s in self._idle]

    def close(self) -> None:
        """Unlink every idle segment; segments in flight are unlinked when their call ends."""
        with self._mutex:
            self._closed = True
            idle, self._idle = self._idle, []
        for segment in idle:
            segment.close()


class SharedBatch:
    """One request's tensors in a segment (from ``pool``, else its own); ``close()`` (or the context manager) gives it back.

    Leaving the context manager with an exception unlinks the segment instead
    of pooling it: after a failed call nothing says the server is done with it.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], pool: SegmentPool | None = None) -> None:
        offsets, size = {}, 0
        for name, array in arrays.items():
            offsets[name] = size
            size += -(-array.nbytes // _ALIGN) * _ALIGN
        self._pool, self._closed = pool, False
        if pool is None:
            self._segment = Segment(size)
            self._segment.lock()
        else:
            self._segment = pool.acquire(size)
        self.name, self.path = self._segment.name, self._segment.path
        try:
            self.tensors = {name: self._write(name, array, offsets[name]) for name, array in arrays.items()}
            self._segment.unlock()
        except BaseException:
            self._segment.close()
            raise

    def _write(self, name: str, array: np.ndarray, offset: int) -> pb.Tensor:
        dtype = dtype_of(array, f"tensors.{name}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        target = np.ndarray(array.shape, dtype=array.dtype, buffer=self._segment.map, offset=offset)
        np.copyto(target, array, casting="no")  # one pass, whatever the source's strides
        del target  # no view may outlive the mapping (close() would refuse)
        region = pb.SharedMemoryRegion(name=self.name, offset=offset, byte_size=array.nbytes)
        return pb.Tensor(dtype=dtype, shape=list(array.shape), shared_memory=region)

    def request(
        self, specs: Sequence[pb.FunctionSpec], *, tags: pb.Tags | Mapping[str, str] | None, return_state: bool, request_id: str
    ) -> bytes:
        """The serialized EvaluateRequest naming this segment's tensors (a few hundred bytes)."""
        message = pb.EvaluateRequest(tensors=self.tensors, functions=specs, return_state=return_state, request_id=request_id)
        tags_msg = tags_proto(tags)
        if tags_msg is not None:
            message.tags.CopyFrom(tags_msg)
        payload: bytes = message.SerializeToString()
        return payload

    def close(self, *, failed: bool = False) -> None:
        """Give the segment back to its pool (unlink it when the call ``failed`` or there is no pool); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is None:
            self._segment.close()
        else:
            self._pool.release(self._segment, reusable=not failed)

    def __enter__(self) -> SharedBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def worth_sharing(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether a batch is large enough for a segment to pay off."""
    return batch_bytes(arrays) >= MIN_SHARED_BYTES


def local_or_reason(address: str) -> str | None:
    """None when shared memory can reach the server at ``address``, else why not."""
    if not SEGMENT_DIRECTORY.is_dir():
        return f"this host has no {SEGMENT_DIRECTORY} (POSIX shared memory)"
    if not is_loopback(address):  # the one rule of "this host" (settings: plaintext/token checks use it too)
        return f"the server {address} is not on this host (loopback or unix socket)"
    return None
