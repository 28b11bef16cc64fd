"""Kindness to the origin and to the link: ORIGIN_CONCURRENCY and FETCH_RATE_LIMIT, kept in Redis.

**Origin slots.** A sorted set per origin host (`udemy_dl:origin-slots:<host>`) holds one member per
task downloading from it, scored with the member's expiry in Redis's own milliseconds. A run takes
a slot with a script that first drops expired members, then adds its own while fewer than the cap
are left; its task lease's renewal keeps the slot alive (TaskLease.renew_with_lease), and the slot
lives as long as a lease (LEASE_TTL) after the last renewal. A killed run's slot therefore frees
within one lease lifetime, and at once on its own host, where a dead holder's PID is seen.

**Byte rate.** One schedule per machine (`udemy_dl:fetch-rate:<hostname>`) shared by every worker
process on it: each reservation of n bytes books n / rate seconds of the link after whatever was
booked before, and says how long to wait before reading them (a virtual-time token bucket, GCRA,
whose bucket holds half a second: time unused for longer is lost).
The fetcher reserves before it reads, so the origin is slowed by TCP's own backpressure.

Both scripts read the time from Redis (`TIME`), so no server's clock decides.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from . import defaults
from .lease import holder_is_dead_here
from .safety import url_target

log = logging.getLogger(__name__)

# KEYS[1] the origin's slots; ARGV: holder, cap, lifetime (ms). 1: the holder has a slot now.
# Renewing runs the same script: the holder's member gets a new expiry, or comes back if it expired
# and a slot is free (after an outage); 0 when others filled the origin meanwhile.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if redis.call('zscore', KEYS[1], ARGV[1]) or redis.call('zcard', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('zadd', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('pexpire', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
# KEYS[1] the machine's schedule; ARGV: bytes, bytes per second, slack (seconds). Returns the
# seconds to wait before reading those bytes (as text: Redis would cut a Lua number to an integer).
# A schedule that fell behind the clock (readers late for their turn) restarts at most *slack*
# seconds back, so late readers catch up that much and no more; a new one starts now.
_RESERVE_BYTES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local booked = tonumber(redis.call('get', KEYS[1]) or now)
local start = math.max(booked, now - tonumber(ARGV[3]))
local finish = start + tonumber(ARGV[1]) / tonumber(ARGV[2])
redis.call('set', KEYS[1], string.format('%.6f', finish), 'PX', math.ceil((finish - now) * 1000) + 60000)
return string.format('%.6f', math.max(start - now, 0))
"""

SLACK_SECONDS = 0.5
"""Unused link time the byte schedule keeps: after a pause, half a second's worth of bytes may come
at once (no more: the rest of the pause is lost), and a reader up to that late catches up."""

SLOT_POLL_SECONDS = 0.2
"""How often a run waiting for an origin slot asks again."""

MIN_RESERVATION = 16 * 1024
"""Fewest bytes one reservation books (a Redis round trip each)."""

RESERVATIONS_PER_SECOND = 10
"""At a low limit, a reservation books at most this fraction of a second's bytes: short bursts."""


def slots_key(host: str) -> str:
    return f"udemy_dl:origin-slots:{host}"


def rate_key(hostname: str) -> str:
    return f"udemy_dl:fetch-rate:{hostname}"


def origin_host(url: str) -> str:
    """The host a download of *url* connects to (canonical: lower case, IDNA, no port): the name its
    slots are counted under. Ports are not told apart, since one machine serves them all."""
    return url_target(url).host


class OriginSlot:
    """One run's slot among ORIGIN_CONCURRENCY at the origin of its course URL, named by *holder*
    (the run's lease token, which names its host and PID)."""

    def __init__(
        self, connection: Redis, host: str, cap: int, holder: str, lifetime: float = defaults.LEASE_TTL
    ) -> None:
        self.connection = connection
        self.host = host
        self.key = slots_key(host)
        self.cap = cap
        self.holder = holder
        self.lifetime_ms = int(lifetime * 1000)
        self.held = False
        self._script = connection.register_script(_TAKE_SLOT)

    def try_take(self) -> bool:
        """Take a slot if one is free now, after dropping slots of dead runs on this host."""
        if self._take():
            return True
        dead = [name for name in self.holders() if holder_is_dead_here(name)]
        if dead:
            self.connection.zrem(self.key, *dead)
            log.warning("origin %s: freed %s slot(s) of dead runs (%s)", self.host, len(dead), ", ".join(dead))
            return self._take()
        return False

    def _take(self) -> bool:
        self.held = bool(self._script(keys=[self.key], args=[self.holder, self.cap, self.lifetime_ms]))
        return self.held

    def wait(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Take a slot, asking every SLOT_POLL_SECONDS for up to *seconds*; False if none came
        free in that time, or *stop* was set."""
        deadline = time.monotonic() + seconds
        while True:
            if self.try_take():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if stop is not None and stop.is_set():  # is_set, not wait(): a RunStop also answers for HAND_BACK
                return False
            time.sleep(min(SLOT_POLL_SECONDS, left))

    def renew(self) -> None:
        """Extend the slot by its lifetime (called with every renewal of the run's lease)."""
        if not self.held:
            return
        if not self._script(keys=[self.key], args=[self.holder, self.cap, self.lifetime_ms]):
            log.warning("origin %s: this run's slot expired and others took the origin's slots meanwhile", self.host)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            self.connection.zrem(self.key, self.holder)
        except RedisError as exc:  # it expires by itself within a lease lifetime
            log.warning("origin %s: slot release failed: %s", self.host, exc)

    def holders(self) -> list[str]:
        """The runs holding (or last holding, if expired and not yet dropped) the origin's slots."""
        members: list[bytes] = self.connection.zrange(self.key, 0, -1)  # type: ignore[assignment]
        return [member.decode() for member in members]


class ByteRate:
    """FETCH_RATE_LIMIT: every download of this machine reserves its bytes from one schedule in Redis.

    Implements fetch.Pacer. Redis not answering lifts the limit until it answers again (logged
    once a minute): a download never fails for the sake of its pace.
    """

    def __init__(self, connection: Redis, bytes_per_second: int, hostname: str | None = None) -> None:
        self.connection = connection
        self.rate = bytes_per_second
        self.key = rate_key(hostname or socket.gethostname())
        self.chunk = max(MIN_RESERVATION, min(defaults.READ_BUFFER_SIZE, bytes_per_second // RESERVATIONS_PER_SECOND))
        """Bytes one reservation books (and the most one read takes)."""
        self.receive_buffer = max(4 * MIN_RESERVATION, bytes_per_second // 4)
        """Each connection's SO_RCVBUF: a quarter of a second at the limit (the kernel caps it at
        net.core.rmem_max), so the origin feels a slow reader within moments, yet one connection
        with round trips up to 250 ms can still reach the limit."""
        self.slack = SLACK_SECONDS
        """Seconds of unused link time the schedule keeps, so readers a moment late for their turn
        (a busy machine) catch up rather than lose it."""
        self._warned = 0.0
        self._script = connection.register_script(_RESERVE_BYTES)

    def reserve(self, count: int) -> float:
        """Book *count* bytes; return the seconds to wait before reading them."""
        try:
            wait = self._script(keys=[self.key], args=[count, self.rate, self.slack])
        except RedisError as exc:
            if time.monotonic() - self._warned >= 60:
                self._warned = time.monotonic()
                log.warning("FETCH_RATE_LIMIT not applied while Redis does not answer: %s", exc)
            return 0.0
        return max(float(wait), 0.0)
