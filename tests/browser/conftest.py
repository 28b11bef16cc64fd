"""Fixtures of the browser tests: Debian's headless Chromium (selenium), real Redis and MariaDB (the
end-to-end tests' databases), a slow local origin, a real worker and `udemy-dl serve` in processes of
their own. The code behind them is in tests/support/browser.py.

A missing Chromium, chromedriver, Redis or MariaDB skips these tests with the reason, except under
CI=true, where it fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from selenium.webdriver.remote.webdriver import WebDriver

from tests.support.browser import Serve, Site, StatusPage, headless_chromium
from tests.support.deployment import site_environ
from tests.support.http_servers import Origin, serving
from tests.support.mariadb import E2E_DB, database_url, fresh_store, require_database
from tests.support.ports import free_port
from tests.support.processes import kill_marked
from tests.support.redis_servers import E2E_REDIS_URL, flushed_client, require_redis
from udemy_dl.tokens import generate_status_secret
from udemy_dl.webhooks import generate_secret

MARKER = "BROWSER_RUN_ID"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: the status page in headless Chromium (tests/browser)")


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One browser for the module (it takes a second to start); each test gets a blank page of its own."""
    with headless_chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


@pytest.fixture
def page(chrome: WebDriver) -> Iterator[StatusPage]:
    yield StatusPage(chrome)
    chrome.switch_to.default_content()
    chrome.get("about:blank")  # the test's page goes, and its stream with it


@pytest.fixture
def redis_e2e() -> Iterator[Redis]:
    require_redis(E2E_REDIS_URL)
    with flushed_client(E2E_REDIS_URL) as connection:
        yield connection


@pytest.fixture
def site(tmp_path: Path, redis_e2e: Redis) -> Iterator[Site]:
    require_database(E2E_DB)
    run_id = uuid.uuid4().hex
    api_secret, status_secret = generate_secret(), generate_status_secret()
    with serving(Origin(tmp_path / "origin")) as origin, fresh_store(E2E_DB) as store:
        env = site_environ(
            MARKER,
            run_id,
            tmp_path,
            REDIS_URL=E2E_REDIS_URL,
            DATABASE_URL=database_url(E2E_DB),
            ALLOWED_HOSTS=origin.host_port,
            API_SECRET_KEY=api_secret,
            STATUS_TOKEN_SECRET=status_secret,
        )
        site = Site(env, api_secret, status_secret, origin, Serve(env, tmp_path, free_port()), store, tmp_path)
        try:
            yield site
        finally:
            site.stop()
            kill_marked(MARKER, run_id)
