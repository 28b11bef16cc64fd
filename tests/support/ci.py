"""Whether the tests run under CI, where a missing service or tool is a failure instead of a skip.

The one place every suite asks (through `unavailable`). CI counts as set for any non-empty value of
the `CI` variable except an explicit "no" (`false`, `0`, `no`, `off`, any case): `CI=true` (this
project's `.ci/run`), `CI=1`, `CI=yes`, `CI=TRUE` all make a missing Redis, MariaDB or tool fail
the run loudly.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

CI_VARIABLE = "CI"
CI_OFF_VALUES = frozenset({"", "false", "0", "no", "off"})
"""Values of `CI` (stripped, lower-cased) that mean "not in CI"; every other value means CI."""


def in_ci() -> bool:
    """True when `CI` is set to anything but an empty value or an explicit false/0/no/off."""
    return os.environ.get(CI_VARIABLE, "").strip().lower() not in CI_OFF_VALUES


def unavailable(what: str, detail: str) -> NoReturn:
    """Skip (a developer's machine) or fail (CI=true) because *what* (a service or a tool) is missing."""
    message = f"{what} not available: {detail}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing service or tool is a failure)", pytrace=False)
    pytest.skip(f"{message} (start it, or run with CI=true to make this a failure)")
