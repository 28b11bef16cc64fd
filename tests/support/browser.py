"""The status page in a real browser: Debian's headless Chromium driven by selenium, a `udemy-dl serve`
process that can be restarted on its port, status tokens minted from the documented format with
nothing but hmac (as the shop's backend would), and the page's state read from its DOM."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from udemy_dl.store import MySQLStore

from .ci import unavailable
from .http_servers import Origin
from .intake import signed_request
from .processes import LoggedProcess, kill_tree, start_logged
from .scripts import cli_command
from .waiting import wait_for

CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"
INSTALL_HINT = "apt-get install -y chromium chromium-driver"


def status_token(secret: str, task_id: int, ttl: int = 900, now: float | None = None) -> str:
    """`v1.<taskId>.<expires>.<base64url(HMAC-SHA256(secret, "v1.<taskId>.<expires>"))>`, written from
    docs/STATUS.md with hmac alone, not with the service's code."""
    expires = int(now if now is not None else time.time()) + ttl
    message = f"v1.{task_id}.{expires}"
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return f"{message}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


def chromium_binaries() -> tuple[str, str]:
    """The paths of chromium and chromedriver; skip (or, under CI, fail) when either is missing."""
    browser = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    driver = shutil.which(CHROMEDRIVER)
    if browser is None or driver is None:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
        unavailable(missing, f"the status page tests need Debian's headless Chromium ({INSTALL_HINT})")
    return browser, driver


@contextmanager
def headless_chromium(folder: Path) -> Iterator[WebDriver]:
    """A headless Chromium (its profile and chromedriver's log in *folder*), quit on the way out."""
    browser, driver = chromium_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={folder / 'profile'}")
    service = ChromeService(executable_path=driver, log_output=str(folder / "chromedriver.log"))
    try:
        chrome = webdriver.Chrome(service=service, options=options)
    except WebDriverException as exc:
        unavailable("chromium", f"{browser} with {driver} did not start: {exc.msg}")
    try:
        yield chrome
    finally:
        chrome.quit()


class _OneAnswer(ThreadingHTTPServer):
    """Answers every GET with the same status and body, and notes each request's path and headers."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, status: int, body: bytes, content_type: str) -> None:
        self.answer = (status, body, content_type)
        self.seen: list[tuple[str, dict[str, str]]] = []
        super().__init__(("127.0.0.1", port), _OneAnswerHandler)


class _OneAnswerHandler(BaseHTTPRequestHandler):
    server: _OneAnswer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, {name.lower(): value for name, value in self.headers.items()}))
        status, body, content_type = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def one_answer(
    status: int, body: bytes, content_type: str = "text/html; charset=utf-8", port: int = 0
) -> Iterator[_OneAnswer]:
    """A server on 127.0.0.1 (*port*, or a free one) that answers every GET alike, for the block."""
    server = _OneAnswer(port, status, body, content_type)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def shop_page(frame_url: str) -> Iterator[str]:
    """A page of the shop's own, on another origin (127.0.0.1, its own port), that embeds *frame_url* in an
    iframe; yields its URL. (A data: URL would not do: Chromium keeps pages of no address from loading local ones.)"""
    html = f'<!doctype html><title>Your order</title><iframe src="{escape(frame_url)}"></iframe>'.encode()
    with one_answer(200, html) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/order"


@contextmanager
def bad_gateway(port: int) -> Iterator[_OneAnswer]:
    """What a proxy in front of serve answers while serve is down: 502 on serve's port."""
    with one_answer(502, b"<html><body>502 Bad Gateway</body></html>", port=port) as server:
        yield server


# -- the page ------------------------------------------------------------------------------------------


@dataclass
class PageState:
    status: str
    text: str
    progress: float
    reason: str
    connection: str


@dataclass
class StatusPage:
    """The status page as a customer's browser shows it; *history* keeps every state seen while waiting."""

    driver: WebDriver
    history: list[PageState] = field(default_factory=list)

    def state(self) -> PageState:
        root = self.driver.find_element(By.ID, "udemy-dl-status")
        status = root.find_element(By.CSS_SELECTOR, "[data-task-status]")
        progress = root.find_element(By.TAG_NAME, "progress")
        reason = root.find_element(By.CSS_SELECTOR, '[data-role="reason"]')
        connection = root.find_element(By.CSS_SELECTOR, "[data-connection]")
        seen = PageState(
            status.get_attribute("data-task-status") or "",
            status.text,
            float(progress.get_attribute("value") or 0),
            reason.text,
            connection.get_attribute("data-connection") or "",
        )
        if not self.history or self.history[-1] != seen:
            self.history.append(seen)
        return seen

    def wait(self, what: str, timeout: float = 30, **expected: object) -> PageState:
        """Until the page's state matches: each keyword names a PageState field and its value, or a callable
        that must be true of it. The failure message lists every state the page went through."""

        def matches(_: WebDriver) -> PageState | bool:
            seen = self.state()
            for name, want in expected.items():
                value = getattr(seen, name)
                if not (want(value) if callable(want) else value == want):
                    return False
            return seen

        try:
            found = cast(PageState, WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(matches))
        except Exception as exc:
            raise AssertionError(f"the page never showed {what} within {timeout:g}s; it went: {self.history}") from exc
        return found

    def statuses(self) -> list[str]:
        """The statuses shown, in order, each once per run of states (none before the first event)."""
        shown: list[str] = []
        for seen in self.history:
            if seen.status and (not shown or shown[-1] != seen.status):
                shown.append(seen.status)
        return shown


# -- the service's web front in a process of its own ------------------------------------------------------


@dataclass
class Serve:
    """`udemy-dl serve` on a fixed port, so it can be killed and started again where the page expects it."""

    env: dict[str, str]
    folder: Path
    port: int
    process: LoggedProcess | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.starts += 1
        command = [*cli_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = start_logged(
            command, self.env, self.folder, self.folder / f"serve-{self.starts}.log", f"serve-{self.starts}"
        )
        wait_for(self._healthy, timeout=timeout, interval=0.05, what=lambda: f"serve to answer /healthz\n{self.log()}")

    def _healthy(self) -> bool:
        assert self.process is not None and self.process.process.poll() is None, f"serve exited:\n{self.log()}"
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, as systemd or a deploy stops it; its exit code (it must stop by itself within *timeout*)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except Exception as exc:
            raise AssertionError(f"serve did not stop within {timeout:g}s of SIGTERM\n{self.log()}") from exc

    def kill(self) -> None:
        if self.process is not None and self.process.process.poll() is None:
            kill_tree(self.process.pid)
            self.process.wait(10)

    def log(self) -> str:
        return self.process.log(tail=4000) if self.process else "(not started)"

    def status_url(self, task_id: int, token: str) -> str:
        return f"{self.base_url}/status/{task_id}?token={token}"

    def confirm(self, secret: str, task_ids: list[int]) -> dict[str, object]:
        """`POST /orders/confirm`, signed as the payment service signs it; the JSON answer (202 expected)."""
        body = json.dumps({"taskIds": task_ids})
        headers = signed_request(secret, "POST", "/orders/confirm", body)
        request = urllib.request.Request(
            f"{self.base_url}/orders/confirm", data=body.encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 202, answer.status
            data: dict[str, object] = json.loads(answer.read())
        return data


@dataclass
class Site:
    """One test's service: its settings, the shop's secrets, the origin, the serve process and the store."""

    env: dict[str, str]
    api_secret: str
    status_secret: str
    origin: Origin
    serve: Serve
    store: MySQLStore
    folder: Path
    workers: list[LoggedProcess] = field(default_factory=list)

    def start_worker(self) -> LoggedProcess:
        """A real worker (`udemy-dl worker`, forking), as start_workers.sh runs it."""
        name = f"browser-{uuid.uuid4().hex[:8]}"
        command = [*cli_command(), "--log-level", "DEBUG", "worker", "--name", name]
        worker = start_logged(command, self.env, self.folder, self.folder / f"{name}.log", name)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        """Kill serve and the workers by their pids (an RQ worker's process title hides the environment marker)."""
        self.serve.kill()
        for worker in self.workers:
            worker.kill()
