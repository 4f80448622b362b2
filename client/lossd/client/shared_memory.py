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

- The client owns every segment: one per request, named
  ``lossd_<pid>_<random>``, created exclusively with mode 0600 (never
  readable by other users), unlinked as soon as the response or the error is
  back, whatever it was (the server crashing mid-request included).
- A finalizer (run by ``atexit`` too) unlinks a segment the code did not
  close. A client killed outright (``kill -9``) cannot: its segments are
  unlinked by the next ``shared_memory=True`` client of the same user on this
  host, which sweeps the ``lossd_<pid>_*`` segments whose process is gone
  (a segment survives until then, and a recycled pid keeps its segments
  until that process ends too).
- The server never creates, keeps or unlinks a segment: it maps it
  read-only for the request's lifetime only (:mod:`lossd.server.shared_memory`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import mmap
import os
import re
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lossd.client.codec import dtype_of
from lossd.client.errors import InvalidArgumentError
from lossd.client.messages import batch_bytes, tags_proto
from lossd.v1 import lossd_pb2 as pb

__all__ = ["MIN_SHARED_BYTES", "SEGMENT_DIRECTORY", "SharedBatch", "is_local_address", "refusal_reason", "sweep_stale_segments"]

log = logging.getLogger("lossd.client")

SEGMENT_DIRECTORY = Path("/dev/shm")
PREFIX = "lossd_"
MIN_SHARED_BYTES = 64 * 1024
_ALIGN = 64  # each tensor starts on a cache line
_OWN_SEGMENT = re.compile(r"lossd_(\d+)_[0-9a-f]{32}")


def is_local_address(address: str) -> bool:
    """Whether ``address`` (``host:port`` or ``unix:path``) is this host: loopback or a unix socket."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


class SharedBatch:
    """One request's segment holding a batch's tensors; ``close()`` (or the context manager) unmaps and unlinks it."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.name = f"{PREFIX}{os.getpid()}_{uuid.uuid4().hex}"
        self.path = str(SEGMENT_DIRECTORY / self.name)
        offsets, size = {}, 0
        for name, array in arrays.items():
            offsets[name] = size
            size += -(-array.nbytes // _ALIGN) * _ALIGN
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._finalizer = weakref.finalize(self, _unlink, self.path)  # unlinked even if close() is never called
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.ftruncate(fd, max(size, 1))
            self._map = mmap.mmap(fd, max(size, 1))
        except BaseException:
            self._finalizer()
            raise
        finally:
            os.close(fd)
        self.tensors: dict[str, pb.Tensor] = {}
        for name, array in arrays.items():
            self.tensors[name] = self._write(name, array, offsets[name])

    def _write(self, name: str, array: np.ndarray, offset: int) -> pb.Tensor:
        dtype = dtype_of(array, f"tensors.{name}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        source = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        target = np.frombuffer(self._map, dtype=np.uint8, count=source.size, offset=offset)
        target[:] = source
        del target  # no view may outlive the mapping (close() would refuse)
        region = pb.SharedMemoryRegion(name=self.name, offset=offset, byte_size=source.size)
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

    def close(self) -> None:
        """Unmap and unlink the segment (idempotent)."""
        if not self._map.closed:
            self._map.close()
        self._finalizer()

    def __enter__(self) -> SharedBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worth_sharing(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether a batch is large enough for a segment to pay off."""
    return batch_bytes(arrays) >= MIN_SHARED_BYTES


def local_or_reason(address: str) -> str | None:
    """None when shared memory can reach the server at ``address``, else why not."""
    if not SEGMENT_DIRECTORY.is_dir():
        return f"this host has no {SEGMENT_DIRECTORY} (POSIX shared memory)"
    if not is_local_address(address):
        return f"the server {address} is not on this host (loopback or unix socket)"
    return None
