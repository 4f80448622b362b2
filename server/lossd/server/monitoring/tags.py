"""Free-form tags (``Tags.extra``): their bounds, and the step/epoch the dashboard plots by.

model/dataset/split are Prometheus labels (behind the series budget of
:mod:`lossd.server.monitoring.labels`); extra tags such as ``step``, ``epoch``
or ``checkpoint`` are not: every training step would be a new set of series.
They go to the dashboard's history only. They are still client-chosen, so the
number of them and their lengths are bounded, and refused with an error
naming the tag rather than truncated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from lossd.kernels.errors import FieldViolation, InvalidInput
from lossd.v1 import lossd_pb2 as pb

__all__ = ["MAX_EXTRA_TAGS", "MAX_TAG_KEY_LENGTH", "MAX_TAG_VALUE_LENGTH", "check_tags", "extra_tag_errors", "progress_of"]

MAX_EXTRA_TAGS = 16
MAX_TAG_KEY_LENGTH = 64
MAX_TAG_VALUE_LENGTH = 256
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_RESERVED = ("model", "dataset", "split")


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def extra_tag_errors(extra: Mapping[str, str], prefix: str = "tags.extra") -> list[tuple[str, str]]:
    """(field, what was expected) for every extra tag out of bounds; empty when all are valid."""
    errors: list[tuple[str, str]] = []
    if len(extra) > MAX_EXTRA_TAGS:
        errors.append((prefix, f"expected at most {MAX_EXTRA_TAGS} extra tags, got {len(extra)}"))
    for key, value in extra.items():
        field = f"{prefix}.{key}" if len(key) <= MAX_TAG_KEY_LENGTH else prefix
        if key in _RESERVED:
            errors.append((field, f"{key!r} is a tag of its own (tags.{key}), not an extra tag"))
        elif len(key) > MAX_TAG_KEY_LENGTH:
            errors.append((field, f"expected tag names of at most {MAX_TAG_KEY_LENGTH} characters, got {len(key)} ({key[:20]!r}...)"))
        elif not _KEY.fullmatch(key):
            errors.append((field, f"expected a tag name of letters, digits, '_', '.', '-' starting with a letter, got {key!r}"))
        if len(value) > MAX_TAG_VALUE_LENGTH:
            errors.append((field, f"expected a value of at most {MAX_TAG_VALUE_LENGTH} characters, got {len(value)}"))
        elif key == "step" and not (value.isascii() and value.isdigit()):
            errors.append((field, f"expected a non-negative integer step, got {value!r}"))
        elif key == "epoch" and ((number := _number(value)) is None or number < 0):
            errors.append((field, f"expected a non-negative number for epoch, got {value!r}"))
    return errors


def check_tags(tags: pb.Tags) -> None:
    """Raise :class:`InvalidInput` (INVALID_ARGUMENT) naming every extra tag out of bounds."""
    errors = extra_tag_errors(tags.extra)
    if errors:
        raise InvalidInput([FieldViolation(field, description) for field, description in errors])


def progress_of(extra: Mapping[str, str]) -> tuple[int | None, float | None]:
    """(step, epoch) of valid extra tags, None where not given."""
    step = extra.get("step")
    epoch = extra.get("epoch")
    return (int(step) if step else None), (_number(epoch) if epoch else None)
