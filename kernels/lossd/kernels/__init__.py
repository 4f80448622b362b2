"""lossd.kernels: every loss, metric and calibration statistic as a mergeable state, on torch.

In-process use gives bit-for-bit the numbers the lossd service returns::

    from lossd.kernels import evaluate
    out = evaluate({"logits": logits, "labels": labels}, ["cross_entropy", {"name": "ece", "params": {"n_bins": 15}}])
    out["cross_entropy"].value
"""

from importlib.metadata import version as _version

from lossd.kernels.declarations import FunctionDef
from lossd.kernels.device import select_device
from lossd.kernels.diagnostics import CODES, Diagnostic
from lossd.kernels.errors import FieldViolation, InvalidInput, StateLimitExceeded
from lossd.kernels.evaluate import (
    DEFAULT_EXACT_STATE_LIMIT,
    Accumulator,
    Evaluation,
    FunctionResult,
    FunctionSpec,
    evaluate,
    finalize_states,
    to_torch,
)
from lossd.kernels.registry import all_functions, get_function
from lossd.kernels.state import MergeOp, State

__all__ = [
    "Accumulator",
    "CODES",
    "DEFAULT_EXACT_STATE_LIMIT",
    "Diagnostic",
    "Evaluation",
    "FieldViolation",
    "FunctionDef",
    "FunctionResult",
    "FunctionSpec",
    "InvalidInput",
    "MergeOp",
    "State",
    "StateLimitExceeded",
    "all_functions",
    "evaluate",
    "finalize_states",
    "get_function",
    "select_device",
    "__version__",
    "to_torch",
]

__version__: str = _version("lossd-kernels")  # the installed distribution's, as lossd.client.__version__
