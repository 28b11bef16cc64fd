"""Redis connections built from REDIS_URL: every scheme the settings accept connects as written."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.support.ci import unavailable
from tests.support.waiting import wait_for
from udemy_dl.connection import redis_connection
from udemy_dl.settings import load_settings, redis_db_of


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Path]:
    """A redis-server of this test's own listening on a unix socket only."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server", "not on PATH (needed for a unix-socket Redis)")
    socket_path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def answers() -> bool:
        if not socket_path.exists():
            return False
        probe = Redis(unix_socket_path=str(socket_path), socket_connect_timeout=1)
        try:
            return bool(probe.ping())
        except RedisError:
            return False
        finally:
            probe.close()

    try:
        wait_for(answers, timeout=10, what="redis-server on its unix socket")
        yield socket_path
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_unix_socket_url_connects_to_the_database_it_names(unix_redis: Path) -> None:
    """`unix:///path?db=3` connects (the TCP-only client options are left out) and uses database 3."""
    settings = load_settings({"REDIS_URL": f"unix://{unix_redis}?db=3"}, env_file=None)
    connection = redis_connection(settings)
    try:
        assert connection.ping()
        connection.set("udemy_dl:test:where", "here")
    finally:
        connection.close()
    check = Redis(unix_socket_path=str(unix_redis), db=3)
    try:
        assert check.get("udemy_dl:test:where") == b"here"
    finally:
        check.close()


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("redis://cache.example:6379/7", 7),
        ("redis://cache.example", 0),
        ("redis://cache.example/", 0),
        ("redis://:pw@cache.example/0?db=5", 5),
        ("rediss://u:p%2Fw@cache.example:6380/12", 12),
        ("unix:///run/redis.sock?db=4", 4),
        ("unix:///run/redis.sock", 0),
    ],
)
def test_redis_db_of_agrees_with_redis_py(url: str, db: int) -> None:
    """The database the Sentinel client is given is the one redis-py reads from the same URL."""
    assert redis_db_of(url) == db
    assert Redis.from_url(url).connection_pool.connection_kwargs.get("db", 0) == db
