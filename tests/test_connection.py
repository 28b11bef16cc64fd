"""Redis connections built from REDIS_URL: every scheme the settings accept connects as written."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.support.ci import unavailable
from tests.support.sentinel import running_sentinel_group
from tests.support.waiting import wait_for
from udemy_dl import status_stream
from udemy_dl.connection import async_redis_connection, redis_connection
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


def test_the_async_client_follows_the_sentinels_to_the_master(tmp_path: Path) -> None:
    """The web front's asyncio client (status streams) finds the master through REDIS_SENTINELS, as the rest does:
    an entry the workers' client appends through the Sentinels is read back through them."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server", "not on PATH (needed for the Sentinels)")
    assert binary is not None
    with running_sentinel_group(binary, tmp_path, f"conn-{uuid.uuid4().hex[:8]}") as group:
        settings = load_settings(
            {"REDIS_URL": "redis://127.0.0.1:6379/0", "REDIS_SENTINELS": group.sentinels_setting}, env_file=None
        )
        entry_id = status_stream.publish_progress(redis_connection(settings), 7, 50, 5, 10, 1, 2)
        assert entry_id is not None

        async def read() -> list[Any]:
            client = async_redis_connection(settings)
            try:
                return list(await client.xrange(status_stream.stream_key(7)))
            finally:
                await client.aclose()

        ((read_id, fields),) = asyncio.run(read())
        assert read_id.decode() == entry_id and fields[b"progress"] == b"50"
        assert group.master.client(timeout=2).exists(status_stream.stream_key(7))
