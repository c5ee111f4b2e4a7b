"""Retrying object-store I/O, in one place: which errors are final and how transient ones are retried."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

PERMANENT_IO_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
"""Errors that another attempt cannot fix; everything else (5xx, throttling, resets) is retried."""

T = TypeVar("T")


def backoff_s(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt + 1``: 0.5, 1, 2, 4 ... at most 10."""
    return min(0.5 * 2**attempt, 10.0)


def with_retries(action: Callable[[], T], retries: int) -> T:
    """``action()``, retried up to ``retries`` times with back-off on errors other than
    ``PERMANENT_IO_ERRORS``; the last error is raised."""
    for attempt in range(retries + 1):
        try:
            return action()
        except PERMANENT_IO_ERRORS:
            raise
        except Exception:
            if attempt == retries:
                raise
            time.sleep(backoff_s(attempt))
    raise AssertionError("unreachable")
