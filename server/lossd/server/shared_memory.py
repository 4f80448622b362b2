"""Tensors in a client's POSIX shared-memory segment (``Tensor.shared_memory``): mapped, never copied.

Off by default (``LOSSD_ALLOW_SHARED_MEMORY=true`` turns it on, like
Triton's ``--allow-client-shm``); only Evaluate's tensors may use it.

Ownership and cleanup (the client side is :mod:`lossd.client.shared_memory`):

- The client creates the segment (mode 0600: readable only by its own user,
  so client and server must run as the same user), writes the tensors, sends
  their name, offset, dtype and shape, and unlinks the segment once the
  response (or an error) has come back.
- The server opens the segment read-only, maps it read-only and closes the
  file at once; the mapping lives as long as the request's tensors (the
  evaluation, and the monitoring summary queued after it) and is unmapped
  when they are dropped. The server never creates, keeps or unlinks a segment.
- A name is refused unless it is ``lossd_`` followed by letters, digits and
  underscores (no path separator, no ``..``); the file must be a regular file
  (no symlink followed); ``offset + byte_size`` must lie within it and
  ``byte_size`` must equal dtype × shape.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import stat

import numpy as np
import torch

from lossd.kernels.errors import InvalidInput
from lossd.server.wire_dtypes import tensor_over, wire_dtype
from lossd.v1 import lossd_pb2 as pb

__all__ = ["SEGMENT_DIRECTORY", "SEGMENT_NAME", "DISABLED_MESSAGE", "shared_tensor"]

SEGMENT_DIRECTORY = "/dev/shm"  # where POSIX shm_open puts segments on Linux
SEGMENT_NAME = re.compile(r"lossd_[A-Za-z0-9_]{1,200}")
# The client recognizes a refusal by this setting name in the field violation (and falls back to the wire).
DISABLED_MESSAGE = "shared memory is off on this server; start it with LOSSD_ALLOW_SHARED_MEMORY=true (setting allow_shared_memory)"


def _map_read_only(name: str, offset: int, size: int, field: str) -> mmap.mmap:
    """Map segment ``name`` read-only, after checking it is a regular file holding ``offset + size`` bytes."""
    try:
        fd = os.open(os.path.join(SEGMENT_DIRECTORY, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
        return mmap.mmap(fd, info.st_size, prot=mmap.PROT_READ) if info.st_size else mmap.mmap(-1, 1)
    finally:
        os.close(fd)  # the mapping stays valid without the descriptor


def shared_tensor(t: pb.Tensor, field: str, *, allowed: bool) -> torch.Tensor:
    """The torch tensor over a shared-memory region (no copy); refused when ``allowed`` is False."""
    region = t.shared_memory
    where = f"{field}.shared_memory"
    if not allowed:
        raise InvalidInput.single(where, DISABLED_MESSAGE)
    if t.data:
        raise InvalidInput.single(f"{field}.data", "expected no data when the tensor lies in shared memory, got bytes")
    if not SEGMENT_NAME.fullmatch(region.name):
        raise InvalidInput.single(f"{where}.name", f"expected 'lossd_' and letters, digits or underscores, got {region.name!r}")
    wire = wire_dtype(t, f"{field}.dtype")
    shape = tuple(t.shape)
    expected = math.prod(shape) * wire[0].itemsize
    if region.byte_size != expected:
        raise InvalidInput.single(
            f"{where}.byte_size", f"expected {expected} bytes for shape {list(shape)} of this dtype, got {region.byte_size}"
        )
    if region.offset % wire[0].itemsize:
        raise InvalidInput.single(f"{where}.offset", f"expected a multiple of the element size {wire[0].itemsize}, got {region.offset}")
    mapped = _map_read_only(region.name, region.offset, expected, where)
    array = np.frombuffer(mapped, dtype=wire[0], count=math.prod(shape), offset=region.offset).reshape(shape)
    return tensor_over(array, wire[1])
