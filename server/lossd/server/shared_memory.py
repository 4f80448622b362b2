"""Tensors in a client's POSIX shared-memory segment (``Tensor.shared_memory``): mapped, never copied.

Off by default (``LOSSD_ALLOW_SHARED_MEMORY=true`` turns it on, like
Triton's ``--allow-client-shm``); only Evaluate's tensors may use it.

Ownership and cleanup (the client side is :mod:`lossd.client.shared_memory`):

- The client creates the segment (mode 0600: readable only by its own user,
  so client and server must run as the same user), writes the tensors, sends
  their name, offset, dtype and shape, and unlinks the segment once the
  response (or an error) has come back.
- The server opens the segment read-only and holds a shared ``flock`` on that
  descriptor for as long as the request's tensors live (the evaluation, and
  the monitoring work queued after the response); the client writes a segment
  only under an exclusive ``flock``, so it never reuses one this server still
  reads. A segment the client is writing is refused (``...shared_memory.name``).
- Mappings are kept for reuse (:class:`_Mappings`: at most
  :data:`CACHED_MAPPINGS` of them and :data:`CACHED_BYTES` bytes, least
  recently used dropped first), so a client's pooled segment is not mapped
  and faulted in again per request. A kept mapping is dropped once its
  segment is unlinked (checked whenever a segment is mapped, and every
  :data:`PRUNE_SECONDS` by a daemon thread while any is kept): the server
  never creates or unlinks a segment, and holds an unlinked one's memory for
  at most about that long after the last request that used it is done.
- A name is refused unless it is ``lossd_`` followed by letters, digits and
  underscores (no path separator, no ``..``); the file must be a regular file
  (no symlink followed); ``offset + byte_size`` must lie within it and
  ``byte_size`` must equal dtype × shape.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import re
import stat
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from lossd.kernels.errors import InvalidInput
from lossd.server.wire_dtypes import check_bool_bytes, check_wire_shape, tensor_over, wire_dtype
from lossd.v1 import lossd_pb2 as pb

__all__ = ["SEGMENT_DIRECTORY", "SEGMENT_NAME", "DISABLED_MESSAGE", "ONLY_EVALUATE_MESSAGE", "MAPPINGS", "shared_tensor"]

SEGMENT_DIRECTORY = "/dev/shm"  # where POSIX shm_open puts segments on Linux
SEGMENT_NAME = re.compile(r"lossd_[A-Za-z0-9_]{1,200}")
# The client recognizes a refusal by this setting name in the field violation (and falls back to the wire).
DISABLED_MESSAGE = "shared memory is off on this server; start it with LOSSD_ALLOW_SHARED_MEMORY=true (setting allow_shared_memory)"
# Stream messages and states always travel as bytes (a stream's batches are sent as they come; states are small).
ONLY_EVALUATE_MESSAGE = "shared memory is taken only for Evaluate's tensors, not here: send these bytes in the message's data"


# O_NONBLOCK: opening a FIFO put there under a segment's name would otherwise wait for a writer, on the
# event loop for a small request (the fstat after it refuses anything but a regular file; a regular file ignores it).
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

CACHED_MAPPINGS = 16
CACHED_BYTES = 4 << 30
PRUNE_SECONDS = 1.0


class _Mappings:
    """Read-only mappings of segments, kept for reuse; keyed by (device, inode, size) of a descriptor just opened by name."""

    def __init__(self) -> None:
        # key -> (a descriptor of the segment, to see when it is unlinked; the mapping)
        self._kept: OrderedDict[tuple[int, int, int], tuple[int, mmap.mmap]] = OrderedDict()
        self._mutex = threading.Lock()
        self._pruner: threading.Thread | None = None
        self._never = threading.Event()  # waited on between prunes (a wait, not a sleep: profiles count it idle)

    def mapping(self, path: str, fd: int, info: os.stat_result) -> mmap.mmap:
        """The mapping of segment ``path``, open at ``fd`` (``info`` its fstat): kept from an earlier request, or new."""
        key = (info.st_dev, info.st_ino, info.st_size)
        with self._mutex:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return kept[1]
        # Python's mmap keeps a dup of the descriptor it maps, which would share (and keep) the request's lock:
        # a kept mapping is made from a descriptor of its own, opened again by name (and checked to be the same file).
        try:
            watch = os.open(path, _OPEN_FLAGS)
        except OSError:  # unlinked meanwhile: mapped for this request only (its lock then lasts as long as the mapping)
            return mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ)
        watched = os.fstat(watch)
        if (watched.st_dev, watched.st_ino, watched.st_size) != key:  # replaced meanwhile: this request only
            os.close(watch)
            return mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ)
        mapped = mmap.mmap(watch, info.st_size, prot=mmap.PROT_READ)
        with self._mutex:
            raced = self._kept.get(key)
            if raced is not None:  # another request mapped it meanwhile: use that one
                os.close(watch)
                return raced[1]
            self._kept[key] = (watch, mapped)
            self._drop(self._unlinked() + self._over_bounds())
            if self._pruner is None:
                self._pruner = threading.Thread(target=self._prune_while_kept, name="lossd-shm-prune", daemon=True)
                self._pruner.start()
        return mapped

    def _unlinked(self) -> list[tuple[int, int, int]]:
        out = []
        for key, (watch, _) in self._kept.items():
            try:
                gone = os.fstat(watch).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                out.append(key)
        return out

    def _over_bounds(self) -> list[tuple[int, int, int]]:
        out, count, total = [], len(self._kept), sum(k[2] for k in self._kept)
        for key in self._kept:  # least recently used first
            if count <= CACHED_MAPPINGS and total <= CACHED_BYTES:
                break
            out.append(key)
            count, total = count - 1, total - key[2]
        return out

    def _drop(self, keys: list[tuple[int, int, int]]) -> None:
        for key in dict.fromkeys(keys):
            watch, _ = self._kept.pop(key)
            os.close(watch)  # the mapping itself goes when no tensor over it is left

    def _prune_while_kept(self) -> None:
        while True:
            self._never.wait(PRUNE_SECONDS)
            with self._mutex:
                self._drop(self._unlinked())
                if not self._kept:
                    self._pruner = None
                    return

    def __len__(self) -> int:
        with self._mutex:
            return len(self._kept)

    def clear(self) -> None:
        """Drop every kept mapping (tests; a server shutting down needs nothing)."""
        with self._mutex:
            self._drop(list(self._kept))


MAPPINGS = _Mappings()


def _open_locked(path: str, name: str, offset: int, size: int, field: str) -> tuple[int, os.stat_result]:
    """Open segment ``name`` read-only under a shared lock, after checking it is a regular file holding ``offset + size`` bytes."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise InvalidInput.single(f"{field}.name", f"cannot open shared-memory segment {name!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput.single(f"{field}.name", f"expected a shared-memory segment, got {name!r} which is not one")
        if offset + size > info.st_size:
            raise InvalidInput.single(
                f"{field}.byte_size", f"offset {offset} + byte_size {size} is past the end of segment {name!r} ({info.st_size} bytes)"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInput.single(
                f"{field}.name", f"expected a segment its client has finished writing, got {name!r} still locked for writing"
            ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def shared_tensor(t: pb.Tensor, field: str, *, allowed: bool, data: memoryview | None = None) -> torch.Tensor:
    """The torch tensor over a shared-memory region (no copy); refused when ``allowed`` is False.

    ``data``: the tensor's data as a view into the received message, where it was parsed that way (it must be empty)."""
    region = t.shared_memory
    where = f"{field}.shared_memory"
    if not allowed:
        raise InvalidInput.single(where, DISABLED_MESSAGE)
    if len(data if data is not None else t.data):
        raise InvalidInput.single(f"{field}.data", "expected no data when the tensor lies in shared memory, got bytes")
    if not SEGMENT_NAME.fullmatch(region.name):
        raise InvalidInput.single(f"{where}.name", f"expected 'lossd_' and letters, digits or underscores, got {region.name!r}")
    wire = wire_dtype(t, f"{field}.dtype")
    shape = tuple(t.shape)
    check_wire_shape(shape, field)
    expected = math.prod(shape) * wire[0].itemsize
    if region.byte_size != expected:
        raise InvalidInput.single(
            f"{where}.byte_size", f"expected {expected} bytes for shape {list(shape)} of this dtype, got {region.byte_size}"
        )
    if region.offset % wire[0].itemsize:
        raise InvalidInput.single(f"{where}.offset", f"expected a multiple of the element size {wire[0].itemsize}, got {region.offset}")
    path = os.path.join(SEGMENT_DIRECTORY, region.name)
    fd, info = _open_locked(path, region.name, region.offset, expected, where)
    try:
        mapped = MAPPINGS.mapping(path, fd, info) if info.st_size else mmap.mmap(-1, 1)
        array = np.frombuffer(mapped, dtype=wire[0], count=math.prod(shape), offset=region.offset).reshape(shape)
        check_bool_bytes(array, field)
    except BaseException:
        os.close(fd)
        raise
    weakref.finalize(array, os.close, fd)  # the shared lock lasts as long as the tensor over the segment
    return tensor_over(array, wire[1])
