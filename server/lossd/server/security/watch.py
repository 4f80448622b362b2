"""Cheap change detection for files that are reloaded while serving (certificates, tokens)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FileSignature", "signature"]

FileSignature = tuple[tuple[int, int, int], ...]  # (inode, size, mtime ns) per file


def signature(paths: Sequence[Path]) -> FileSignature:
    """What changes when any of ``paths`` is rewritten or replaced (a missing file reads as zeros)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0))
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)
