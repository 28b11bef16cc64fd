"""Waiting for a condition, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "",
    error: type[Exception] = AssertionError,
) -> T:
    """Poll *predicate* until it returns something truthy, and return that; fail after *timeout* seconds.

    *what* describes the wait in the failure message; a callable is asked only on timeout (e.g. a worker log).
    The failure is an *error* (AssertionError in a test; the bench raises its own).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            description = what() if callable(what) else what
            raise error(f"timed out after {timeout:g}s waiting for {description or predicate!r}")
        time.sleep(interval)  # the polling period of the wait


def holds_for(
    predicate: Callable[[], object], seconds: float, interval: float = 0.05, what: str | Callable[[], str] = ""
) -> None:
    """Poll *predicate* for *seconds*, failing the moment it is falsy: a deadline on a negative
    ("nothing starts while paused"), the one kind of wait that cannot end early."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            description = what() if callable(what) else what
            raise AssertionError(f"stopped holding after {seconds - (deadline - time.monotonic()):.2f}s: {description}")
        time.sleep(interval)
