"""Imports every family module so that its functions register themselves."""

from lossd.kernels import calibration  # noqa: F401
from lossd.kernels.losses import (  # noqa: F401
    binary,
    classification,
    embedding,
    preference,
    regression,
    sequence,
)
from lossd.kernels.metrics import classification as classification_metrics  # noqa: F401
from lossd.kernels.metrics import ranking  # noqa: F401
from lossd.kernels.metrics import regression as regression_metrics  # noqa: F401
