"""Hostile requests to the intake, generated: whatever a client sends, the answer is not a 5xx and the log holds
no traceback.

One property over the whole request: method, request-target, headers (Content-Length in every malformed shape,
chunked bodies, the webhook-* headers garbled or signed in the old body-only scheme) and body (JSON of any shape,
huge integers, NaN, duplicate keys, deep nesting, bytes that are not UTF-8, bodies over the limit). Requests are
sent as raw bytes, so nothing on the client side tidies them up first. Most are signed correctly, so the checks
behind authentication are reached as well.

The one 5xx a client may cause on purpose is 505 for a request line claiming HTTP/2 or later, which this test
does not send; an unknown method is answered like a known one on the wrong route (404 or 405), not 501.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.intake import NOT_PLAIN_DIGITS, Intake, LogRecords, new_msg_id, signed_request, wire
from udemy_dl.webhooks import sign_headers

STATUS_LINE = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")


# -- the parts of a request -----------------------------------------------------------------------------

LATIN1_VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0xFF)
ANY_TEXT = st.characters(codec="utf-8", exclude_characters="\r\n")

METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    st.from_regex(r"[A-Za-z]{1,10}", fullmatch=True),
)

TASK_IDS = st.one_of(
    st.integers(min_value=1, max_value=10**6).map(str),
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    st.sampled_from(
        [
            "\u0663",  # an Arabic-Indic digit, as UTF-8 bytes
            "%D9%A3",
            "²",
            "%C2%B2",
            *NOT_PLAIN_DIGITS,
            "9" * 19,
            str(2**63),
            "%",
            "%ff",
            "1%00",
            "1.0",
            "1e3",
            "",
        ]
    ),
    st.text(LATIN1_VISIBLE, max_size=30),
)

TARGETS = st.one_of(
    TASK_IDS.map(lambda task_id: f"/tasks/{task_id}"),
    st.tuples(TASK_IDS, st.text(LATIN1_VISIBLE, max_size=10)).map(lambda t: f"/tasks/{t[0]}?{t[1]}"),
    st.sampled_from(
        [
            "/orders/confirm",
            "/orders/confirm?priority=high",
            "//orders/confirm",
            "/orders/confirm/",
            "/healthz",
            "/metrics",
            "http://[/tasks/1",
            "http://intake/orders/confirm",
            "*",
            "/tasks/1#x",
            "/tasks/",
            "/tasks/1/2",
        ]
    ),
    st.text(LATIN1_VISIBLE, min_size=1, max_size=40),
)

CONTENT_LENGTHS = st.one_of(
    st.just("exact"),
    st.just("absent"),
    st.sampled_from(
        ["²", "\u0661\u0662", "-1", "+5", "0", "00", "1_0", "0x10", "1e3", "", " ", "5 5", "5,5", "1" * 4301, "9" * 30]
    ),
    st.integers(min_value=-10, max_value=2 * 1024 * 1024).map(str),
)

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 3, max_value=2**80),
    st.floats(),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
CONFIRM_BODIES = st.fixed_dictionaries(
    {"taskIds": st.one_of(st.lists(JSON_VALUES, max_size=6), JSON_VALUES)},
    optional={"priority": st.one_of(st.sampled_from(["normal", "high"]), JSON_VALUES), "extra": JSON_VALUES},
).map(lambda body: json.dumps(body).encode())  # json.dumps writes NaN and Infinity for floats that are not finite


def nested(depth: int) -> bytes:
    return b'{"taskIds": [' + b"[" * depth + b"]" * depth + b"]}"


SPECIAL_BODIES = st.one_of(
    st.sampled_from(
        [
            b'{"taskIds": [' + b"7" * 4301 + b"]}",
            b'{"taskIds": [' + b"7" * 4300 + b"]}",
            b'{"taskIds": [1], "taskIds": [2]}',
            b'{"taskIds": [NaN]}',
            b'{"taskIds": [Infinity]}',
            b'{"taskIds": [1e400]}',
            b'{"taskIds": [1.0]}',
            b'{"taskIds": [true]}',
            b'{"taskIds": ["\\ud800"]}',
            b'{"taskIds": [1], "priority": "\xc3\x28"}',
            b"\xff\xfe{}",
            b"[" * 60_000,
            b'{"taskIds": [1]}' + b" " * 70_000,
            b"",
            b"null",
            b"{}",
        ]
    ),
    st.integers(min_value=1, max_value=3000).map(nested),
)

VALID_BODIES = st.fixed_dictionaries(
    {"taskIds": st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=5)},
    optional={"priority": st.sampled_from(["normal", "high"])},
).map(lambda body: json.dumps(body).encode())

BODIES = st.one_of(VALID_BODIES, CONFIRM_BODIES, SPECIAL_BODIES, st.binary(max_size=100))

GARBLED_HEADERS = st.fixed_dictionaries(
    {
        "webhook-id": st.one_of(st.just(new_msg_id()), st.text(ANY_TEXT, max_size=300)),
        "webhook-timestamp": st.one_of(
            st.sampled_from(["1e400", "nan", "inf", "-1", "9" * 40, "²", "\u0661", "1_700_000_000", ""]),
            st.text(ANY_TEXT, max_size=20),
        ),
        "webhook-signature": st.one_of(
            st.sampled_from(["v1,", "v1,!!", "v1", "v1,a,b", "v2,abc", "v1,YQ==", " ".join(["v1,YQ=="] * 200)]),
            st.text(ANY_TEXT, max_size=80),
        ),
    }
)

SIGNING = st.sampled_from(["request", "request", "request", "body-only", "none", "garbled"])

EXTRA_HEADERS = st.lists(
    st.one_of(
        st.just(("Transfer-Encoding", "chunked")),
        st.just(("Expect", "100-continue")),
        st.just(("Connection", "keep-alive")),
        st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True), st.text(ANY_TEXT, max_size=30)),
    ),
    max_size=3,
)


@st.composite
def requests(draw: st.DrawFn, secret: str) -> tuple[bytes, dict[str, Any]]:
    """One raw HTTP/1.x request, and what it was made of (for the failure message)."""
    route = draw(st.sampled_from(["confirm", "confirm", "confirm", "task", "task", "any"]))
    if route == "confirm":  # the right method and path, so the checks on the body are reached
        method, target = "POST", draw(st.sampled_from(["/orders/confirm", "/orders/confirm?x=1"]))
    elif route == "task":
        method, target = "GET", draw(TASK_IDS.map(lambda task_id: f"/tasks/{task_id}"))
    else:
        method, target = draw(METHODS), draw(TARGETS)
    body = draw(BODIES) if route != "task" or draw(st.booleans()) else b""
    content_length = draw(st.one_of(st.just("exact"), CONTENT_LENGTHS))
    signing = draw(SIGNING)
    text = body.decode("utf-8", "replace")
    headers: list[tuple[str, str]] = [("Host", "intake")]
    if signing == "request":
        headers += signed_request(secret, method, target, text).items()
    elif signing == "body-only":
        headers += sign_headers(secret, new_msg_id(), text).items()
    elif signing == "garbled":
        headers += draw(GARBLED_HEADERS).items()
    if content_length == "exact":
        headers.append(("Content-Length", str(len(body))))
    elif content_length != "absent":
        headers.append(("Content-Length", content_length))
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        headers += draw(EXTRA_HEADERS)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    lines = [f"{method} {target} {version}", *(f"{name}: {value}" for name, value in headers)]
    made_of = {"method": method, "target": target, "signing": signing, "headers": headers, "body": body[:200]}
    return b"".join(wire(line) + b"\r\n" for line in lines) + b"\r\n" + body, made_of


def statuses(port: int, data: bytes) -> list[int]:
    """Send *data* on a new connection, end the sending side, and return every status line that comes back."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # a broken pipe, a reset: refused before the whole body was read, the answer is there
            pass
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return [int(status) for status in STATUS_LINE.findall(b"".join(chunks))]


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_no_request_gets_a_5xx_or_leaves_a_traceback(
    intake: Intake, intake_log: LogRecords, data: st.DataObject
) -> None:
    raw, made_of = data.draw(requests(intake.secret))
    intake_log.records.clear()
    answered = statuses(intake.port, raw)
    event(f"answered {answered[-1] if answered else 'nothing'} {made_of['signing']} {made_of['method']}")
    assert all(status < 500 for status in answered), (answered, made_of)
    assert intake_log.tracebacks() == [], made_of
