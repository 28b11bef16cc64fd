"""Status tokens: who may watch one task's live status in a browser (docs/STATUS.md).

    v1.<taskId>.<expires, unix seconds>.<signature>
    signature = base64url, no padding, of HMAC-SHA256(STATUS_TOKEN_SECRET, "v1.<taskId>.<expires>")

The shop's backend mints one per task and hands it to the customer's page; any language can mint
it with one HMAC call (clients/node/status-token.mjs). The key is STATUS_TOKEN_SECRET, never
API_SECRET_KEY: a token sits in a browser, and nothing in it may help anyone sign a webhook.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

DEFAULT_TTL = 900
"""Seconds a token minted without a ttl stays good (15 minutes)."""

MAX_TTL = 30 * 24 * 3600
"""Longest ttl `status_token` mints (30 days): a token is a bearer credential in a URL."""

VERSION = "v1"

_TOKEN_RE = re.compile(r"v1\.([1-9][0-9]{0,18})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})")
"""A well-formed token: version, task id, expiry in ASCII digits, 32 bytes of HMAC in unpadded base64url."""


class TokenError(ValueError):
    """A token that does not let its bearer watch: `status` is 401 (missing, malformed, expired, wrongly
    signed) or 403 (a good token for another task)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def generate_status_secret() -> str:
    """A new STATUS_TOKEN_SECRET: 32 random bytes, base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def _signature(secret: str, task_id: int, expires: int) -> str:
    message = f"{VERSION}.{task_id}.{expires}".encode("ascii")
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def status_token(task_id: int, ttl: int = DEFAULT_TTL, *, secret: str, now: float | None = None) -> str:
    """A token that lets its bearer watch task *task_id* for *ttl* seconds from *now*."""
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id <= 0:
        raise ValueError(f"task id must be a positive integer, got {task_id!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
        raise ValueError(f"ttl must be whole seconds from 1 to {MAX_TTL}, got {ttl!r}")
    if not secret:
        raise ValueError("a status token needs STATUS_TOKEN_SECRET")
    expires = int(now if now is not None else time.time()) + ttl
    return f"{VERSION}.{task_id}.{expires}.{_signature(secret, task_id, expires)}"


@dataclass(frozen=True)
class TokenClaims:
    task_id: int
    expires: int


def verify_status_token(token: str | None, task_id: int, secret: str, now: float | None = None) -> TokenClaims:
    """The claims of *token* when it lets its bearer watch *task_id* now; else TokenError (401 or 403).

    The signature is checked before the expiry and the task, so a forged token learns nothing.
    """
    if not token:
        raise TokenError(401, "a status token is required: ?token=<token>")
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise TokenError(401, "malformed status token: expected v1.<taskId>.<expires>.<signature>")
    claimed_task, expires = int(match.group(1)), int(match.group(2))
    if not hmac.compare_digest(_signature(secret, claimed_task, expires), match.group(3)):
        raise TokenError(401, "status token signature does not match")
    if expires <= (now if now is not None else time.time()):
        raise TokenError(401, "status token expired: ask the shop for a new one")
    if claimed_task != task_id:
        raise TokenError(403, "this status token is for another task")
    return TokenClaims(claimed_task, expires)
