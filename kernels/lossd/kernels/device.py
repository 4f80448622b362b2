"""Compute-device selection: CUDA when present, else CPU; never a silent fallback."""

from __future__ import annotations

import torch

__all__ = ["select_device"]


def select_device(spec: str = "auto") -> torch.device:
    """Resolve ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` to a device.

    ``auto`` picks CUDA when available.  Asking for CUDA on a machine without
    it raises instead of quietly running on the CPU."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine; use --device cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    raise ValueError(f"expected device auto, cpu, cuda or cuda:N, got {spec!r}")
