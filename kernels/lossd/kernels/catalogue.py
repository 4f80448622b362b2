"""The catalogue: the family modules whose functions lossd serves.

Each family module lists its functions in a ``FUNCTIONS`` tuple;
:mod:`lossd.kernels.registry` builds the lookup from exactly the modules
named here.  A test walks the package and fails on a module that declares a
function but is missing from this list, so no function is silently left out.
"""

from __future__ import annotations

from types import ModuleType

from lossd.kernels.calibration import ece, temperature
from lossd.kernels.losses import (
    auxiliary,
    binary,
    classification,
    embedding,
    margin_softmax,
    preference,
    regression,
    sequence,
    softmax_variants,
)
from lossd.kernels.metrics import accuracy, auc, probabilistic, ranking
from lossd.kernels.metrics import regression as regression_metrics

__all__ = ["FAMILY_MODULES"]

FAMILY_MODULES: tuple[ModuleType, ...] = (
    regression,
    binary,
    classification,
    softmax_variants,
    sequence,
    embedding,
    margin_softmax,
    preference,
    auxiliary,
    regression_metrics,
    accuracy,
    auc,
    probabilistic,
    ranking,
    ece,
    temperature,
)
