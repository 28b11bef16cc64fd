"""Fetchers under test: one allowed exactly the given origins, DNS made to answer loopback, and a
run killed at the rename that completes a part file."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from dev.devservers import ContentOrigin
from udemy_dl.errors import FetchError
from udemy_dl.fetch import Fetcher

TIMEOUT = (5.0, 10.0)
"""The fetchers' (connect, read) timeouts in the tests."""


class Killed(BaseException):
    """The run was killed (raised where a kill -9 would have struck)."""


def fetcher_for(*servers: ContentOrigin, token: str | None = None, **options: Any) -> Fetcher:
    """A fetcher whose ALLOWED_HOSTS lists exactly these servers' host:port."""
    return Fetcher({server.host_port for server in servers}, token=token, timeout=TIMEOUT, **options)


def resolve_to_loopback(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """Make DNS answer 127.0.0.1 for *host* (as a hostile or misconfigured DNS record would)."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        return real_getaddrinfo("127.0.0.1" if name == host else name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@contextlib.contextmanager
def cut_transfer(origin: ContentOrigin, url_path: str, after: int) -> Iterator[pytest.ExceptionInfo[FetchError]]:
    """For the block, the origin cuts each transfer of *url_path* after *after* bytes: the block's fetch must
    fail (FetchError, yielded), keeping the bytes it got."""
    origin.truncate[url_path] = after
    try:
        with pytest.raises(FetchError) as caught:
            yield caught
    finally:
        del origin.truncate[url_path]


@contextlib.contextmanager
def killed_at_part_rename() -> Iterator[None]:
    """The block's run dies (Killed, expected and caught here) between writing a complete `.part` file
    and renaming it into place; every other rename goes through."""
    real_replace = os.replace

    def killed_at_rename(source: Any, target: Any) -> None:
        if str(source).endswith(".part"):
            raise Killed()
        real_replace(source, target)

    with mock.patch.object(os, "replace", killed_at_rename), pytest.raises(Killed):
        yield
