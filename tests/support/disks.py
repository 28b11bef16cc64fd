"""The download disk in tests: what shutil.disk_usage answers, and a report from another host."""

from __future__ import annotations

from typing import NamedTuple

from redis import Redis

from udemy_dl import disk

FAR_HOST = disk.DiskReport(
    host="far-host", path="/srv/courses", total=100 * 10**9, free=3 * 10**9, warn=10**10, floor=1
)
"""Another host's download disk, below its warning level: 3 GB free of 100 GB, warning under 10 GB."""


class Usage(NamedTuple):
    """What shutil.disk_usage answers."""

    total: int
    used: int
    free: int


def report_far_host(connection: Redis) -> disk.DiskReport:
    """Record FAR_HOST's report in Redis, as its workers would."""
    with connection.pipeline() as pipe:
        disk.report(pipe, FAR_HOST)
        pipe.execute()
    return FAR_HOST
