"""The download disk's free space, per host: measured where the files land, reported to Redis by
each host's workers, and read back by health, stats and /metrics (served on any one host).

A full disk fails paid orders (a download needs its size plus DISK_HEADROOM free), and delivered
courses stay in DOWNLOAD_DIR until the operator removes them, so the free space is watched before
it runs out: below the warning level (DISK_WARN_BYTES, else DISK_WARN_SHARE of the disk) health
and stats warn and the alert fires; below DISK_HEADROOM health fails.
"""

from __future__ import annotations

import logging
import shutil
import socket
from dataclasses import asdict, dataclass

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from . import defaults
from .settings import Settings

log = logging.getLogger(__name__)

REPORT_KEY = "udemy_dl:disk:{host}"
"""A hash per host: its latest DiskReport (expires DISK_REPORT_TTL seconds after its last refresh)."""
HOSTS_KEY = "udemy_dl:disk-hosts"
"""The hosts that have reported (a member whose report expired is dropped when read)."""


@dataclass(frozen=True)
class DiskReport:
    """One host's download disk: where, how big, how much is free, and its two levels."""

    host: str
    path: str
    total: int
    free: int
    warn: int
    """Free bytes below which it warns."""
    floor: int
    """Free bytes below which no download can go on (DISK_HEADROOM)."""

    @property
    def level(self) -> str:
        """`ok`, `low` (below warn) or `full` (below the floor)."""
        if self.free < self.floor:
            return "full"
        return "low" if self.free < self.warn else "ok"


def warn_level(settings: Settings, total: int) -> int:
    """DISK_WARN_BYTES, or else DISK_WARN_SHARE of a disk of *total* bytes (never below the floor)."""
    chosen = settings.disk_warn_bytes or int(total * defaults.DISK_WARN_SHARE)
    return max(chosen, defaults.DISK_HEADROOM)


def measure(settings: Settings) -> DiskReport | None:
    """This host's download disk now; None when DOWNLOAD_DIR does not exist (yet) or cannot be read."""
    try:
        usage = shutil.disk_usage(settings.download_dir)
    except OSError:
        return None
    return DiskReport(
        host=socket.gethostname(),
        path=str(settings.download_dir),
        total=usage.total,
        free=usage.free,
        warn=warn_level(settings, usage.total),
        floor=defaults.DISK_HEADROOM,
    )


def report(pipe: Redis | Pipeline, found: DiskReport) -> None:
    """Queue *found* on *pipe* (the caller executes it): the host's hash, its expiry, the host set."""
    key = REPORT_KEY.format(host=found.host)
    pipe.hset(key, mapping={name: str(value) for name, value in asdict(found).items()})
    pipe.expire(key, defaults.DISK_REPORT_TTL)
    pipe.sadd(HOSTS_KEY, found.host)


def reported(connection: Redis) -> list[DiskReport]:
    """Every host's latest report, by host name (hosts whose report expired are forgotten)."""
    hosts = sorted(member.decode() for member in connection.smembers(HOSTS_KEY))  # type: ignore[union-attr]
    found = []
    for host in hosts:
        raw: dict[bytes, bytes] = connection.hgetall(REPORT_KEY.format(host=host))  # type: ignore[assignment]
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        try:
            found.append(
                DiskReport(
                    host=host,
                    path=fields["path"],
                    **{name: int(fields[name]) for name in ("total", "free", "warn", "floor")},
                )
            )
        except (KeyError, ValueError):  # expired (or not ours): the host has not reported lately
            connection.srem(HOSTS_KEY, host)
    return found


def known(settings: Settings, connection: Redis | None) -> list[DiskReport]:
    """Every host's report, this host's measured afresh (and shown even before a worker reported it)."""
    disks: dict[str, DiskReport] = {}
    if connection is not None:
        try:
            disks = {found.host: found for found in reported(connection)}
        except RedisError as exc:
            log.warning("disk reports not read: %s", exc)
    here = measure(settings)
    if here is not None:
        disks[here.host] = here
    return [disks[host] for host in sorted(disks)]


def human(count: float) -> str:
    """Bytes for people: `1.5 GB` (powers of 1000, as `df -H`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def describe(found: DiskReport) -> str:
    """`vps1: 12.0 GB free of 100.0 GB (12%) on /opt/udemy_dl/downloads`."""
    share = 100 * found.free / found.total if found.total else 0
    return f"{found.host}: {human(found.free)} free of {human(found.total)} ({share:.0f}%) on {found.path}"
