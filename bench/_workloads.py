"""The tensors of every scenario (the same bytes in every process, from a seed) and in-process torch baselines.

Drivers (bench/_driver.py, possibly in a peer's venv) and the orchestrator
(bench/bench_serve.py) both build their tensors here, so the torch baseline
and the servers see identical data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FOUR = ["cross_entropy", "accuracy", "ece", "entropy"]
ECE_BINS = 15


def logits_labels(rows: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits (scale 2) and int64 labels."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, classes), dtype=np.float32) * 2), rng.integers(0, classes, rows, dtype=np.int64)


def binary_scores(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits [rows] and float32 targets in {0, 1} for AUROC."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, rows).astype(np.float32)
    return (rng.standard_normal(rows, dtype=np.float32) + targets).astype(np.float32), targets


def as_torch(logits: np.ndarray, dtype: str) -> Any:
    """The logits as a torch tensor of ``dtype`` ("float32" or "bfloat16")."""
    import torch

    z = torch.from_numpy(logits)
    return z.to(torch.bfloat16) if dtype == "bfloat16" else z


def torch_functions(z: Any, y: Any, functions: list[str]) -> dict[str, float]:
    """What a training script computes in process: torch one function at a time."""
    import torch
    import torch.nn.functional as F

    out: dict[str, float] = {}
    for name in functions:
        if name == "cross_entropy":
            out[name] = float(F.cross_entropy(z, y))
        elif name == "accuracy":
            out[name] = float((z.argmax(1) == y).float().mean())
        elif name == "ece":
            conf, pred = torch.softmax(z.float(), 1).max(1)
            idx = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1)
            gap = torch.bincount(idx, weights=conf - (pred == y).float(), minlength=ECE_BINS).abs()
            out[name] = float(gap.sum() / len(y))
        elif name == "entropy":
            lp = torch.log_softmax(z.float(), 1)
            out[name] = float(-(lp.exp() * lp).sum(1).mean())
        else:
            raise ValueError(f"no torch baseline for {name!r}")
    return out
