"""Value checks shared by every config and API boundary (torch-free).

Each check returns the value it accepted, so a caller writes ``n = require_int("block_size", n, minimum=1)``,
and raises ``error`` (a :class:`~dspark_core.errors.DSparkError` subclass by default
:class:`~dspark_core.errors.DraftConfigError`) with a message that names the field. ``bool`` is never an
int or a number here, although Python says it is: ``block_size=True`` is a mistake, not 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeGuard

from dspark_core.errors import DraftConfigError

__all__ = [
    "is_int",
    "is_real",
    "require_choice",
    "require_int",
    "require_number",
]


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool`` (a type guard, so a checked value reads as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN and inf included)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def require_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[Exception] = DraftConfigError,
    hint: str = "",
) -> int:
    """``value`` as an int within ``[minimum, maximum]``; ``name`` is written as given (quote it yourself)."""
    suffix = f". {hint}" if hint else ""
    if not is_int(value):
        raise error(f"{name} must be an int, got {type(value).__name__} {value!r}{suffix}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}{suffix}")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be <= {maximum}, got {value}{suffix}")
    return value


def require_number(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    finite: bool = True,
    error: type[Exception] = DraftConfigError,
    hint: str = "",
) -> float:
    """``value`` as a float: finite unless ``finite=False``, ``>= minimum``, ``> above``, ``<= maximum``."""
    suffix = f". {hint}" if hint else ""
    if not is_real(value):
        raise error(f"{name} must be a number, got {type(value).__name__} {value!r}{suffix}")
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)):
        raise error(f"{name} must be a finite number, got {value!r}{suffix}")
    if minimum is not None and not number >= minimum:
        raise error(f"{name} must be >= {minimum}, got {value!r}{suffix}")
    if above is not None and not number > above:
        raise error(f"{name} must be > {above}, got {value!r}{suffix}")
    if maximum is not None and not number <= maximum:
        raise error(f"{name} must be <= {maximum}, got {value!r}{suffix}")
    return number


def require_choice(
    name: str, value: Any, choices: Iterable[str], *, error: type[Exception] = DraftConfigError
) -> str:
    """``value`` if it is one of ``choices``; the message lists them."""
    allowed = tuple(choices)
    if value not in allowed:
        raise error(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)
