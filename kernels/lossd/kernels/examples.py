"""Building blocks of example inputs: clean random tensors, as numpy arrays.

Every :class:`~lossd.kernels.declarations.FunctionDef` carries an
:class:`~lossd.kernels.declarations.Example` built from these, so that the
tests of the whole catalogue (valid requests, error cases, distributed merges)
read each function's inputs from its declaration.  Scores are unnormalized
normal draws, labels cover every class, probabilities are distributions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Arrays", "normal", "softmax", "log_softmax", "class_labels", "binary_targets", "K", "D", "T", "V"]

Arrays = dict[str, np.ndarray]

K = 4  # classes
D = 6  # embedding width
T, V = 5, 7  # sequence length, vocabulary


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Standard normal float32 draws of ``shape``."""
    return rng.standard_normal(shape).astype(np.float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows of ``x`` turned into distributions over ``axis``."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    probs: np.ndarray = (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)
    return probs


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows of ``x`` turned into log-distributions over ``axis``."""
    logs: np.ndarray = np.log(softmax(x, axis)).astype(x.dtype)
    return logs


def class_labels(n: int, k: int = K) -> np.ndarray:
    """``n`` int64 labels cycling over ``k`` classes: every class present, none rare."""
    return np.arange(n) % k


def binary_targets(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random 0/1 float32 targets of ``shape``."""
    return rng.integers(0, 2, shape).astype(np.float32)
