"""Times a slow suite measures (recovery after a fault, a failover), printed as they come and as a
table at the end of the session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Measurement:
    scenario: str
    metric: str
    seconds: float
    limit: float | None = None
    note: str = ""


MEASUREMENTS = pytest.StashKey[dict[str, list[Measurement]]]()
"""Each suite's measurements, by the suite's name."""


def record(
    config: pytest.Config,
    suite: str,
    scenario: str,
    metric: str,
    seconds: float,
    limit: float | None = None,
    note: str = "",
) -> float:
    """Print a measured time and keep it for *suite*'s table at the end of the session."""
    config.stash.setdefault(MEASUREMENTS, {}).setdefault(suite, []).append(
        Measurement(scenario, metric, seconds, limit, note)
    )
    bound = f" (limit {limit:g} s)" if limit is not None else ""
    print(f"[{suite}] {scenario}: {metric} = {seconds:.1f} s{bound}{' - ' + note if note else ''}")
    return seconds


def write_summary(terminalreporter: Any, config: pytest.Config, suite: str, title: str) -> None:
    """*suite*'s measurements as a table under *title* (nothing if it measured nothing)."""
    items = config.stash.get(MEASUREMENTS, {}).get(suite, [])
    if not items:
        return
    terminalreporter.write_sep("=", title)
    width = max(len(item.scenario) for item in items)
    metric_width = max(len(item.metric) for item in items)
    terminalreporter.write_line(
        f"{'scenario':<{width}}  {'metric':<{metric_width}}  {'seconds':>8}  {'limit':>6}  note"
    )
    for item in items:
        limit = f"{item.limit:g}" if item.limit is not None else "-"
        terminalreporter.write_line(
            f"{item.scenario:<{width}}  {item.metric:<{metric_width}}  {item.seconds:>8.1f}  {limit:>6}  {item.note}"
        )
