"""Status tokens (docs/STATUS.md): minted here, by `udemy-dl status-token`, and by clients/node/status-token.mjs
with nothing but node:crypto; checked by our verifier against tokens made with plain hmac in this file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import udemy_dl
from tests.support.ci import in_ci
from tests.support.scripts import cli_command, run_command
from udemy_dl.cli import RET_CONFIG, RET_OK, RET_USAGE
from udemy_dl.errors import ConfigError
from udemy_dl.fetch_command import withheld_from_command
from udemy_dl.settings import Settings, get_settings, load_settings
from udemy_dl.tokens import TokenError, generate_status_secret, status_token, verify_status_token

SECRET = "s" * 40
NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node" / "status-token.mjs"


def plain_token(task_id: int, expires: int, secret: str = SECRET) -> str:
    """The format written from the spec, with nothing of ours."""
    message = f"v1.{task_id}.{expires}"
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return message + "." + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def test_a_plain_hmac_token_is_accepted_for_its_task() -> None:
    expires = int(time.time()) + 60
    claims = verify_status_token(plain_token(7, expires), 7, SECRET)
    assert (claims.task_id, claims.expires) == (7, expires)


@pytest.mark.parametrize(
    ("token", "status", "words"),
    [
        (None, 401, "required"),
        ("", 401, "required"),
        ("v1.7.notanumber.abc", 401, "malformed"),
        ("v2.7.9999999999." + "A" * 43, 401, "malformed"),
        ("expired", 401, "expired"),
        ("wrong-secret", 401, "signature"),
        ("other-task", 403, "another task"),
    ],
    ids=["absent", "empty", "malformed", "version", "expired", "wrong-secret", "other-task"],
)
def test_bad_tokens_are_refused_with_401_or_403(token: str | None, status: int, words: str) -> None:
    now = int(time.time())
    made = {
        "expired": plain_token(7, now - 1),
        "wrong-secret": plain_token(7, now + 60, secret="t" * 40),
        "other-task": plain_token(8, now + 60),
    }
    with pytest.raises(TokenError) as caught:
        verify_status_token(made.get(token or "", token), 7, SECRET)
    assert caught.value.status == status and words in str(caught.value)


def test_our_token_is_the_documented_format() -> None:
    token = status_token(42, 120, secret=SECRET, now=1_800_000_000)
    assert token == plain_token(42, 1_800_000_120)


@pytest.mark.parametrize(("task_id", "ttl"), [(0, 60), (-1, 60), (1, 0), (1, 10**9)])
def test_status_token_refuses_a_bad_task_id_or_ttl(task_id: int, ttl: int) -> None:
    with pytest.raises(ValueError, match=r"task id|ttl"):
        status_token(task_id, ttl, secret=SECRET)


def test_the_package_mints_with_the_settings_secret(configure: Callable[..., Settings]) -> None:
    configure(STATUS_TOKEN_SECRET=SECRET)
    get_settings.cache_clear()
    try:
        verify_status_token(udemy_dl.status_token(5, ttl=30), 5, SECRET)
    finally:
        get_settings.cache_clear()


def test_the_secret_is_its_own_and_never_shown() -> None:
    settings = load_settings({"STATUS_TOKEN_SECRET": generate_status_secret()}, env_file=None)
    assert settings.status_token_secret and settings.status_token_secret not in repr(settings)
    assert withheld_from_command("STATUS_TOKEN_SECRET")
    webhook_key = "whsec_" + base64.b64encode(b"k" * 32).decode()
    for value, words in [("tiny-Secret9", "too short"), (webhook_key, "not be API_SECRET_KEY")]:
        with pytest.raises(ConfigError) as caught:
            load_settings({"STATUS_TOKEN_SECRET": value, "API_SECRET_KEY": webhook_key}, env_file=None)
        assert caught.value.variable == "STATUS_TOKEN_SECRET" and words in str(caught.value)
        assert value not in str(caught.value)


def test_cors_origins_are_parsed_and_a_bad_one_is_named() -> None:
    settings = load_settings({"CORS_ORIGINS": "https://Shop.example, http://localhost:3000,"}, env_file=None)
    assert settings.cors_origins == ("https://shop.example", "http://localhost:3000")
    for bad in ["shop.example", "https://shop.example/path", "*", "ftp://shop.example", "https://"]:
        with pytest.raises(ConfigError) as caught:
            load_settings({"CORS_ORIGINS": f"https://ok.example,{bad}"}, env_file=None)
        assert caught.value.variable == "CORS_ORIGINS" and repr(bad)[:20] in str(caught.value), bad


def cli(*args: str, **env: str) -> tuple[int, str, str]:
    done = run_command([*cli_command(), *args], env={**os.environ, **env}, cwd=Path.cwd())
    return done.returncode, done.stdout.strip(), done.stderr


def test_cli_prints_a_token_the_verifier_accepts_and_needs_the_secret() -> None:
    code, token, _ = cli("status-token", "12", "--ttl", "60", STATUS_TOKEN_SECRET=SECRET)
    assert code == RET_OK
    assert verify_status_token(token, 12, SECRET).expires <= time.time() + 61
    code, _, err = cli("status-token", "12")
    assert code == RET_CONFIG and "STATUS_TOKEN_SECRET" in err
    code, _, err = cli("status-token", "x12", STATUS_TOKEN_SECRET=SECRET)
    assert code == RET_USAGE and "x12" in err
    code, made, _ = cli("gen-secret", "--status")
    assert code == RET_OK and len(made) == 43 and load_settings({"STATUS_TOKEN_SECRET": made}, env_file=None)


def test_the_node_client_mints_a_token_our_verifier_accepts() -> None:
    node = shutil.which("node")
    if node is None:
        if in_ci():
            pytest.fail("node is needed on PATH (CI=true: a missing tool is a failure)", pytrace=False)
        pytest.skip("node is not on PATH")
    done = run_command([node, NODE_CLIENT, "31", "120"], env={**os.environ, "STATUS_TOKEN_SECRET": SECRET})
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert verify_status_token(token, 31, SECRET).expires > time.time() + 100
    with pytest.raises(TokenError):
        verify_status_token(token, 31, "x" * 40)
