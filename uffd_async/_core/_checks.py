"""Argument checks, one wording: every refusal is an :class:`InvalidArgument` (EINVAL).

Why one module: the same mistake (a bool where a count belongs, a page size that
is not a power of two) used to be refused in some thirty hand-written ways, as a
TypeError here, a ValueError there, worded differently each time.

A value of the wrong type raises :class:`InvalidArgumentType`, which is also the
:class:`TypeError` callers catch for that; a value out of range raises
:class:`InvalidArgument`, a :class:`ValueError`. The message names the parameter,
says what it must be and shows what it got. ``bool`` is refused wherever an int
or a number is wanted: ``True`` is 1 to Python, but never what a caller meant by
a count, a size or an address.

Kernel-free: no syscall, nothing but the standard library and the error tree.
"""

from __future__ import annotations

import errno
import math
from typing import TypeVar

from ._errors import InvalidArgument, InvalidArgumentType

__all__ = [
    "MIN_PAGE_SIZE",
    "check_instance",
    "check_int",
    "check_page_size",
    "check_percentile",
    "check_seconds",
    "is_page_size",
]

T = TypeVar("T")

#: The smallest page size Linux has on any architecture this library serves.
MIN_PAGE_SIZE = 4096


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    expected: str | None = None,
) -> int:
    """``value`` if it is an int (not a bool) within [minimum, maximum], else refuse it.

    ``expected`` replaces the generated "an int >= N" where the domain has a
    better word for it ("permission bits (0 to 0o777)").
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(
            f"{name} must be {expected or 'an int'}, not {type(value).__name__}"
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        wanted = expected or f"an int {_bounds(minimum, maximum)}"
        raise InvalidArgument(errno.EINVAL, f"{name} must be {wanted}, not {value!r}")
    return value


def is_page_size(value: int, maximum: int | None = None) -> bool:
    """Whether ``value`` is a power of two of at least 4096 (and at most ``maximum``).

    For checks that refuse with another error (a file's header, a peer's message).
    """
    return (
        value >= MIN_PAGE_SIZE and not value & (value - 1) and (maximum is None or value <= maximum)
    )


def check_page_size(name: str, value: object, *, maximum: int | None = None) -> int:
    """``value`` if it is a page size: a power of two, at least 4096 (at most ``maximum``)."""
    size = check_int(name, value)
    if not is_page_size(size, maximum):
        upper = f"from {MIN_PAGE_SIZE} to {_bytes(maximum)}" if maximum else f">= {MIN_PAGE_SIZE}"
        raise InvalidArgument(errno.EINVAL, f"{name} must be a power of two {upper}, not {size!r}")
    return size


def check_seconds(
    name: str, value: object, *, maximum: float | None = None, zero: bool = False
) -> float:
    """``value`` if it is a finite number of seconds > 0 (>= 0 with ``zero``), <= ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number of seconds, not {type(value).__name__}")
    wanted, ok = (">= 0", value >= 0) if zero else ("> 0", value > 0)
    if maximum is not None:
        wanted, ok = f"{wanted} and <= {maximum}", ok and value <= maximum
    if not ok or not math.isfinite(value):
        raise InvalidArgument(
            errno.EINVAL, f"{name} must be a finite number of seconds {wanted}, not {value!r}"
        )
    return value


def check_percentile(name: str, value: object) -> float:
    """``value`` if it is a number from 0 to 100 (NaN is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidArgumentType(
            f"{name} must be a number from 0 to 100, not {type(value).__name__}"
        )
    if not 0 <= value <= 100:  # NaN fails both comparisons
        raise InvalidArgument(errno.EINVAL, f"{name} must be a number from 0 to 100, not {value!r}")
    return value


def check_instance(name: str, value: object, cls: type[T]) -> T:
    """``value`` if it is a ``cls``, else refuse it (:class:`InvalidArgumentType`)."""
    if not isinstance(value, cls):
        article = "an" if cls.__name__[:1] in "AEIO" else "a"  # "a Userfaultfd", "an OnError"
        raise InvalidArgumentType(
            f"{name} must be {article} {cls.__name__}, not {type(value).__name__}"
        )
    return value


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"from {minimum} to {maximum}"
    if minimum is not None:
        return f">= {minimum}"
    return f"<= {maximum}"


def _bytes(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and not size % (1 << shift):
            return f"{size >> shift} {unit}"
    return str(size)
