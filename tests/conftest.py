"""Shared fixtures: deterministic seeds, warnings as errors (pyproject), shared helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # the client tests run without torch too
        pass
