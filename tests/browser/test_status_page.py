"""The status page (GET /status/<id>?token=...) in headless Chromium, against the real service: a worker
downloading from a slow local origin, `udemy-dl serve` restarted mid-download, and the failed path in an
iframe. The page is opened before payment, as the shop's order page would be."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from importlib import resources

import pytest
from selenium.webdriver.common.by import By

from tests.support.browser import Site, StatusPage, bad_gateway, shop_page, status_token
from tests.support.waiting import wait_for
from udemy_dl.store import PENDING, PROCESSING

pytestmark = pytest.mark.browser

EMAIL = "buyer@shop.example"
COURSE_BYTES = 1_800_000
THROTTLE = 150_000
"""Bytes per second the origin sends: the course takes about 12 s, long enough to restart serve in the middle."""


def open_before_payment(site: Site, page: StatusPage, course_url: str) -> int:
    """A pending order, its status page open and live; then the payment service confirms it."""
    task_id = site.store.insert_task(EMAIL, course_url, PENDING)
    site.serve.start()
    site.start_worker()
    page.driver.get(site.serve.status_url(task_id, status_token(site.status_secret, task_id)))
    page.wait("the pending order, live", status="pending", connection="live")
    answer = site.serve.confirm(site.api_secret, [task_id])
    assert answer["enqueued"] == [task_id], answer
    return task_id


def assert_went_through_in_order(page: StatusPage) -> None:
    """pending, processing, completed, each once, and the progress never going back."""
    assert page.statuses() == ["pending", "processing", "completed"], page.history
    shown = [seen.progress for seen in page.history if seen.status in ("processing", "completed")]
    assert shown == sorted(shown), f"the progress went back: {shown}"


def test_the_page_follows_a_download_to_completed_through_a_restart_of_serve(site: Site, page: StatusPage) -> None:
    site.origin.throttle = THROTTLE
    task_id = open_before_payment(site, page, site.origin.add_course("slow", {"lecture.mp4": COURSE_BYTES}))

    first = page.wait("processing with some progress", status="processing", progress=lambda p: p > 0)
    before = page.wait("the progress rising", status="processing", progress=lambda p: p > first.progress)
    assert site.serve.stop() == 0, site.serve.log()
    row = site.store.get(task_id)
    assert row is not None and row.status == PROCESSING, "serve stopped after the download, not during it"
    restarted_at = len(page.history)
    site.serve.start()

    end = page.wait("completed", timeout=45, status="completed", progress=100)
    assert end.text.strip(), "no readable text beside the status"
    after = page.history[restarted_at:]
    assert any(seen.connection == "reconnecting" for seen in page.history), page.history
    assert any(seen.status == "processing" and seen.progress > before.progress for seen in after), (
        f"no progress shown after the restart: {page.history}"
    )
    assert_went_through_in_order(page)
    assert page.wait("the stream closed", connection="closed")


def test_a_page_whose_stream_was_refused_opens_a_new_one_from_its_last_event(site: Site, page: StatusPage) -> None:
    """While serve is down, a proxy in front of it answers 502: EventSource gives up on an error status, so the
    page itself opens a new stream once serve is back, passing the id of the last event it had."""
    site.origin.throttle = THROTTLE
    open_before_payment(site, page, site.origin.add_course("slow", {"lecture.mp4": COURSE_BYTES // 2}))
    page.wait("processing with some progress", status="processing", progress=lambda p: p > 0)
    assert site.serve.stop() == 0, site.serve.log()
    with bad_gateway(site.serve.port) as gateway:
        retries = wait_for(
            lambda: [headers for path, headers in gateway.seen if "/events" in path],
            timeout=20,
            what=lambda: f"the page's stream to try again (the page went: {page.history})",
        )
        page.wait("the page to notice", connection="reconnecting")
    retried = retries[0]
    assert retried.get("last-event-id"), f"EventSource retried without Last-Event-ID: {retried}"
    site.serve.start()

    page.wait("completed", timeout=45, status="completed", progress=100)
    assert "lastEventId=" in site.serve.log(), "the page's new stream did not say where it stopped"
    assert_went_through_in_order(page)


def test_a_page_whose_link_expired_says_so_instead_of_retrying(site: Site, page: StatusPage) -> None:
    """The token expires while the page is open; after a restart of serve the stream answers 401, and the page
    stops with a message instead of retrying for ever."""
    task_id = site.store.insert_task(EMAIL, f"{site.origin.base_url}/courses/never-paid", PENDING)
    site.serve.start()
    token = status_token(site.status_secret, task_id, ttl=3)
    page.driver.get(site.serve.status_url(task_id, token))
    page.wait("the pending order, live", status="pending", connection="live")
    expires = int(token.split(".")[2])
    wait_for(lambda: time.time() > expires + 1, timeout=10, interval=0.1, what="the token to expire")
    assert site.serve.stop() == 0, site.serve.log()
    site.serve.start()

    expired = page.wait("the expired link", connection="expired")
    assert expired.status == "pending", "the last status known is kept"
    message = page.driver.find_element(By.CSS_SELECTOR, "[data-connection]").text
    assert "expired" in message, message


def test_a_failed_order_shows_failed_and_its_reason_in_an_iframe(site: Site, page: StatusPage) -> None:
    missing = f"{site.origin.base_url}/courses/no-such-course"  # the origin answers 404: a permanent failure
    task_id = site.store.insert_task(EMAIL, missing, PENDING)
    site.serve.start()
    site.start_worker()
    url = site.serve.status_url(task_id, status_token(site.status_secret, task_id))
    with shop_page(url) as order_page:
        page.driver.get(order_page)
        page.driver.switch_to.frame(page.driver.find_element(By.TAG_NAME, "iframe"))
        page.wait("the pending order in the iframe", status="pending", connection="live")
        answer = site.serve.confirm(site.api_secret, [task_id])
        assert answer["enqueued"] == [task_id], answer
        end = page.wait("failed, with a reason", status="failed", reason=lambda text: bool(text.strip()))
    assert end.text.strip(), "no readable text beside the status"
    assert page.wait("the stream closed", connection="closed")
    row = site.store.get(task_id)
    assert row is not None and row.error_message, "the row holds no reason"
    assert "127.0.0.1" not in end.reason, f"the customer sees an internal address: {end.reason!r}"


# -- what the shop copies: no inline script, no server data parsed as HTML -----------------------------------


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handlers += [f"<{tag} {name}>" for name, _ in attrs if name.lower().startswith("on")]
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data.strip())


def static(name: str) -> str:
    return resources.files("udemy_dl").joinpath("static", name).read_text(encoding="utf-8")


def test_the_page_has_no_inline_script_and_loads_one_script_file() -> None:
    parsed = _Scripts()
    parsed.feed(static("status.html"))
    assert parsed.scripts == [{"src": "../static/status.js"}]
    assert parsed.inline == [] and parsed.handlers == []


@pytest.mark.parametrize("sink", ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("])
def test_the_script_never_parses_server_data_as_html_or_code(sink: str) -> None:
    assert sink not in static("status.js")
