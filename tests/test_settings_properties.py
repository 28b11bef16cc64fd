"""Properties of the settings, on generated values: every bad value of a typed variable stops
load_settings with a ConfigError naming that variable (and never repeating a secret it holds), and a
command given one exits 3, the status systemd's RestartPreventExitStatus=3 does not restart.

Each typed variable has a strategy of values that are wrong for it (malformed, out of range, or
readable two ways); secrets are generated with a recognisable marker so a message that repeats any
sizeable part of one is caught.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.scripts import run_command
from udemy_dl.errors import ConfigError
from udemy_dl.settings import MAX_INT, MAX_RATE, MAX_WORKERS, VARIABLES, load_settings

PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@dataclass(frozen=True)
class Bad:
    """A bad value for a variable, with the secret part of it (if any) that no message may repeat."""

    value: str
    secret: str | None = None
    also: tuple[tuple[str, str], ...] = ()
    """Other variables set alongside (good values), when the bad one is only read with them."""


# -- building blocks ------------------------------------------------------------------------------

marker = st.from_regex(r"[0-9a-f]{6,10}", fullmatch=True).map(lambda tail: f"Qz{tail}")
"""A piece of a secret: `Qz` and hex, which no message text holds by chance."""

url_special = st.sampled_from("/?#")
control = st.sampled_from(["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\u2028", " "])
not_a_number = st.text(min_size=1, max_size=12).filter(
    lambda text: text.strip() != "" and re.fullmatch(r"-?[0-9]+", text.strip()) is None
)
url_host_char = st.sampled_from([*" \\!$&'()*+,;=<>\"{}|^`~%", "\n", "\x00"])
"""Characters that make a bad host inside a URL (`/`, `?`, `#`, `@` and `:` end or split it: still a URL)."""
host_char = st.one_of(url_host_char, st.sampled_from("/@:"))
"""Characters that make a bad host on its own (REDIS_HOST, DB_HOST, a Sentinel)."""


def secret_with_special(pieces: int = 2) -> st.SearchStrategy[str]:
    """A password holding an unencoded `/`, `?` or `#` between marker pieces."""
    return st.lists(marker, min_size=pieces, max_size=pieces + 1).flatmap(
        lambda parts: st.lists(url_special, min_size=len(parts) - 1, max_size=len(parts) - 1).map(
            lambda seps: "".join(part + sep for part, sep in zip(parts, [*seps, ""], strict=True))
        )
    )


def spliced(good: str, chars: st.SearchStrategy[str] = url_host_char) -> st.SearchStrategy[str]:
    """*good* with one bad host character put inside it."""
    return st.tuples(st.integers(1, len(good) - 1), chars).map(lambda cut: good[: cut[0]] + cut[1] + good[cut[0] :])


def ints(minimum: int, maximum: int) -> st.SearchStrategy[Bad]:
    """Not a whole number (`1.5`, `abc`, `1_000`, `٣`), or one outside [minimum, maximum]."""
    return st.one_of(
        not_a_number,
        st.sampled_from(["1_000", "+5", "0x10", "1e3", "\u0663", "1.5", "5 5", "--1"]),
        st.integers(max_value=minimum - 1).map(str),
        st.integers(min_value=maximum + 1, max_value=maximum * 10**30).map(str),
    ).map(Bad)


# -- URLs -----------------------------------------------------------------------------------------


def with_bad_number(template: str, values: list[str]) -> st.SearchStrategy[Bad]:
    """*template* (with {pw} and {value}) given letters, or one of *values*, where a number belongs."""
    return st.builds(
        lambda pw, value: Bad(template.format(pw=pw, value=value), pw),
        marker,
        st.one_of(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.sampled_from(values)),
    )


def redis_urls() -> st.SearchStrategy[Bad]:
    password = marker
    return st.one_of(
        st.builds(
            lambda pw, s: Bad(f"{s}://:{pw}@cache.example:6379/0", pw),
            password,
            st.sampled_from(["http", "REDIS", "redis+tls", "mysql", "tcp"]),
        ),
        st.builds(lambda pw: Bad(f"redis:/:{pw}@cache.example/0", pw), password),
        with_bad_number("redis://:{pw}@cache.example:{value}/0", ["0", "65536", "99999", "-1", "63 79"]),
        with_bad_number("redis://:{pw}@cache.example:6379/{value}", ["-1", "1/2", "0x1", "1.0", "%74en"]),
        st.builds(lambda pw: Bad(f"redis://:{pw}@cache.example:6379/0?db=ten", pw), password),
        st.builds(
            lambda pw, name: Bad(f"redis://:{pw}@cache.example/0?{name}=1", pw),
            password,
            st.from_regex(r"[a-z]{3,10}", fullmatch=True).filter(lambda n: n not in KNOWN_OPTIONS),
        ),
        st.builds(lambda pw: Bad(f"redis://:{pw}@cache.example/0#frag", pw), password),
        st.builds(lambda pw: Bad(f"redis://:{pw}@/0", pw), password),
        st.builds(lambda pw, host: Bad(f"redis://:{pw}@{host}:6379/0", pw), password, spliced("cache.example")),
        st.builds(lambda pw, ch: Bad(f"redis://:{pw}@cache.example:63{ch}79/0", pw), password, control),
        st.builds(lambda pw: Bad(f"redis://:{pw}@cache.example:6379/0", pw), secret_with_special()),
        st.builds(lambda pw: Bad(f"rediss://user:{pw}@cache.example/0", pw), secret_with_special()),
        st.builds(lambda pw: Bad(f"unix://:{pw}@cache.example/run/redis.sock", pw), password),
        st.builds(lambda pw: Bad(f"unix://:{pw}@/run/redis.sock?db=x", pw), password),
        st.builds(lambda pw: Bad(f"redis://:{pw}@cache.example/0?ssl_ca_certs=/ca.pem", pw), password),
    )


KNOWN_OPTIONS = {"db", "timeout", "password", "username", "client_name"}


def password_url_cases(template: str, scheme: str, host: str, wrong_schemes: list[str]) -> list[st.SearchStrategy[Bad]]:
    """What every URL holding a password must refuse, the password in hand: *template* (with {scheme}, {pw} and
    {host}) under a wrong scheme, with no host, with a spliced host, and with a secret of special characters."""

    def url(pw: str, scheme: str = scheme, host: str = host) -> Bad:
        return Bad(template.format(scheme=scheme, pw=pw, host=host), pw)

    return [
        st.builds(url, marker, st.sampled_from(wrong_schemes)),
        st.builds(lambda pw: url(pw, host=""), marker),
        st.builds(lambda pw, spliced_host: url(pw, host=spliced_host), marker, spliced(host)),
        st.builds(url, secret_with_special()),
    ]


def database_urls() -> st.SearchStrategy[Bad]:
    password = marker
    return st.one_of(
        *password_url_cases(
            "{scheme}://shop:{pw}@{host}/shop", "mysql", "db.example", ["postgres", "MYSQL", "mariadb", "http"]
        ),
        with_bad_number("mysql://shop:{pw}@db.example:{value}/shop", ["0", "65536", "-3306"]),
        st.builds(
            lambda pw, tail: Bad(f"mysql://shop:{pw}@db.example{tail}", pw),
            password,
            st.sampled_from(["", "/", "/shop/more", "/shop?charset=x", "/shop#x"]),
        ),
        st.builds(lambda pw: Bad(f"sqlite://shop:{pw}@db.example/tasks.db", pw), password),
        st.sampled_from(
            ["sqlite://", "sqlite:///", "sqlite:tasks.db", "sqlite:///data/", "mysql://db.example/shop"]
        ).map(Bad),
    )


def webhook_urls() -> st.SearchStrategy[Bad]:
    return st.one_of(
        *password_url_cases(
            "{scheme}://hook:{pw}@{host}/hook", "https", "pay.example", ["ftp", "ws", "file", "javascript"]
        ),
        st.builds(lambda pw: Bad(f"https://hook:{pw}@pay.example:port/hook", pw), marker),
    )


# -- the table: every variable, typed or not ------------------------------------------------------

FOLDER_IS_A_FILE = Bad(__file__)
TYPED: dict[str, Callable[[], st.SearchStrategy[Bad]]] = {
    "WORKER_COUNT": lambda: ints(1, MAX_WORKERS),
    "FETCH_CONCURRENCY": lambda: ints(1, MAX_WORKERS),
    "MAX_ATTEMPTS": lambda: ints(1, MAX_INT),
    "JOB_TIMEOUT": lambda: ints(1, MAX_INT),
    "STOP_TIMEOUT": lambda: ints(1, MAX_INT),
    "RETRY_DELAY": lambda: ints(0, MAX_INT),
    "RESULT_TTL": lambda: ints(0, MAX_INT),
    "FAILURE_TTL": lambda: ints(0, MAX_INT),
    "RECONCILE_INTERVAL": lambda: ints(0, MAX_INT),
    "MAX_TASK_BYTES": lambda: ints(0, 2**63 - 1),
    "DISK_WARN_BYTES": lambda: ints(0, 2**63 - 1),
    "ORIGIN_CONCURRENCY": lambda: ints(0, MAX_INT),
    "FETCH_RATE_LIMIT": lambda: st.one_of(
        st.text(min_size=1, max_size=12).filter(
            lambda text: text.strip() != "" and re.fullmatch(r"[0-9]{1,15}[KMGkmg]?", text.strip()) is None
        ),
        st.sampled_from(["1.5M", "5MB", "5 M", "-1", "2T", "1_000", "+5", "\u0663", "5Mi", "K"]),
        st.integers(min_value=MAX_RATE + 1, max_value=10**15 - 1).map(str),
    ).map(Bad),
    "REDIS_PORT": lambda: ints(1, 65535),
    "DB_PORT": lambda: ints(1, 65535),
    "REDIS_DB": lambda: ints(0, MAX_INT),
    "REDIS_URL": redis_urls,
    "DATABASE_URL": database_urls,
    "WEBHOOK_URL": webhook_urls,
    **{
        name: lambda: st.one_of(
            st.just(FOLDER_IS_A_FILE),
            st.tuples(st.text(max_size=8), control.filter(lambda c: c != " ")).map(
                lambda t: Bad(f"/srv/{t[0]}{t[1]}x")
            ),
        )
        for name in ("DOWNLOAD_DIR", "FAILED_DIR", "LOG_DIR", "PID_DIR")
    },
    "REDIS_HOST": lambda: spliced("cache.example", host_char).map(Bad),
    "DB_HOST": lambda: spliced("db.example", host_char).map(
        lambda host: Bad(host, None, (("DB_USER", "u"), ("DB_NAME", "n")))
    ),
    "DB_NAME": lambda: st.one_of(
        st.sampled_from(["shop/x", "x" * 65, "sh\nop", "shop\x00"]),
        st.from_regex(r"[a-z]{1,10}/[a-z]{1,10}", fullmatch=True),
    ).map(lambda name: Bad(name, None, (("DB_HOST", "db.example"), ("DB_USER", "u")))),
    "DB_USER": lambda: st.tuples(marker, control.filter(lambda c: c != " ")).map(lambda t: Bad(f"u{t[1]}{t[0]}")),
    "ALLOWED_HOSTS": lambda: st.sampled_from(
        ["*", "*.*", "cdn.example,*", "http://cdn.example/x", "user@cdn.example", "cdn.example/path"]
    ).map(Bad),
    "REDIS_SENTINELS": lambda: st.one_of(
        st.sampled_from(["sentinel", "sentinel:", "sentinel:abc", "sentinel:0", "sentinel:70000", ":26379"]),
        spliced("sentinel.example", host_char).map(lambda host: f"{host}:26379"),
    ).map(Bad),
    "WEBHOOK_RETRY_INTERVALS": lambda: st.one_of(
        st.sampled_from(["10,,20", ",", "-1", "1.5", "10;20", "a", "10,\u0663", "10, 2 0"]),
        st.lists(st.integers(0, 100), min_size=1, max_size=4).map(lambda values: ",".join(map(str, values)) + ",x"),
    ).map(Bad),
    **{
        name: lambda: (
            st.text(min_size=1, max_size=12)
            .filter(lambda text: text.strip() != "" and re.fullmatch(r"[A-Za-z0-9_-]+", text.strip()) is None)
            .map(Bad)
        )
        for name in ("QUEUE_NAME", "REDIS_SENTINEL_MASTER")
    },
    "FETCH_COMMAND": lambda: st.sampled_from(
        ["wget {url}", "fetch --out {dest}", "fetch '{url} {dest}", 'fetch "{url}" {dest} "', "fetch"]
    ).map(Bad),
    "API_SECRET_KEY": lambda: st.one_of(
        marker.map(lambda secret: Bad(f"sk_{secret}", secret)),
        marker.map(lambda secret: Bad(f"whsec_{secret}*!", secret)),
        st.binary(min_size=9, max_size=23)
        .map(lambda key: base64.b64encode(key).decode())
        .map(lambda encoded: Bad(f"whsec_{encoded}", encoded)),
    ),
    "CONTENT_TOKEN": lambda: st.tuples(marker, control.filter(lambda c: c != " "), marker).map(
        lambda t: Bad(f"{t[0]}{t[1]}{t[2]}", t[0])
    ),
    "DASHBOARD_USERNAME": lambda: st.tuples(marker, st.sampled_from([":", "\n", "\x1b"]), marker).map(
        lambda t: Bad(f"{t[0]}{t[1]}{t[2]}", None, (("DASHBOARD_PASSWORD", "pw"),))
    ),
    "DASHBOARD_PASSWORD": lambda: st.tuples(marker, control.filter(lambda c: c != " "), marker).map(
        lambda t: Bad(f"{t[0]}{t[1]}{t[2]}", t[0], (("DASHBOARD_USERNAME", "ops"),))
    ),
    "HORSE_MAX_JOBS": lambda: ints(1, MAX_INT),
    "STATUS_TOKEN_SECRET": lambda: st.one_of(
        marker.map(lambda secret: Bad(f"{secret}", secret)),  # too short
        st.tuples(marker, control.filter(lambda c: c != " ")).map(lambda t: Bad(f"{t[0]}{t[1]}{'x' * 40}", t[0])),
    ),
    "CORS_ORIGINS": lambda: st.sampled_from(
        ["*", "shop.example", "https://shop.example/", "https://shop.example/path", "ftp://shop.example", "https://"]
    ).map(lambda origin: Bad(f"https://ok.example,{origin}")),
}
"""Variable -> strategy of values wrong for it."""

UNTYPED = {"REDIS_PASSWORD", "DB_PASSWORD", "REDIS_SENTINEL_PASSWORD"}
"""Secrets that are any string: they are percent-encoded into their URL or sent as given."""


def test_every_variable_is_classified() -> None:
    """A new setting must say here what a bad value of it looks like (or that it has none)."""
    assert set(TYPED) | UNTYPED == set(VARIABLES), sorted(set(VARIABLES) ^ (set(TYPED) | UNTYPED))


def bad_settings() -> st.SearchStrategy[tuple[str, Bad]]:
    return st.sampled_from(sorted(TYPED)).flatmap(lambda name: TYPED[name]().map(lambda bad: (name, bad)))


def assert_refused(variable: str, bad: Bad) -> None:
    environ = {**dict(bad.also), variable: bad.value}
    with pytest.raises(ConfigError) as caught:
        load_settings(environ, env_file=None)
    message = str(caught.value)
    assert caught.value.variable == variable, (environ, message)
    assert variable in message
    if bad.secret is not None:
        for text in (message, repr(caught.value)):
            assert bad.secret not in text, (environ, text)
            for piece in re.findall(r"Qz[0-9a-f]{6,10}", bad.secret):
                assert piece not in text, (environ, text)


@PROPERTY
@given(bad_settings())
@example(("REDIS_URL", Bad("redis://127.0.0.1:6379/ten")))
@example(("REDIS_URL", Bad("redis://:s3c/ret@127.0.0.1:6379/0", "s3c/ret")))
@example(("DATABASE_URL", Bad("mysql://root:pw@127.0.0.1:abc/shop", "pw")))
def test_bad_value_is_refused_naming_its_variable(case: tuple[str, Bad]) -> None:
    """load_settings refuses any bad value of a typed variable: a ConfigError that names it, not a
    traceback, not a silent other meaning, and never the secret the value holds."""
    assert_refused(*case)


@pytest.mark.parametrize("variable", sorted(TYPED))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_each_typed_variable_has_bad_values_refused(variable: str, data: st.DataObject) -> None:
    """The same, for each variable in turn (so none is left to chance)."""
    assert_refused(variable, data.draw(TYPED[variable](), label=variable))


def env_safe(case: tuple[str, Bad]) -> bool:
    """A value a process environment can carry (no NUL, encodable)."""
    value = case[1].value
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_settings().filter(env_safe))
@example(("REDIS_URL", Bad("redis://:s3c/ret@127.0.0.1:6379/0", "s3c/ret")))
@example(("WORKER_COUNT", Bad("1_000")))
def test_a_command_given_a_bad_value_exits_3(case: tuple[str, Bad]) -> None:
    """`python -m udemy_dl health` exits 3 naming the variable, the secret nowhere in its output
    (a subprocess each: a few examples only)."""
    variable, bad = case
    environ = {**os.environ, **dict(bad.also), variable: bad.value}
    done = run_command([sys.executable, "-m", "udemy_dl", "health"], env=environ, cwd=Path.cwd())
    assert done.returncode == 3, (variable, bad, done.stdout, done.stderr)
    assert variable in done.stderr and "Traceback" not in done.stderr
    if bad.secret is not None:
        assert bad.secret not in done.stdout + done.stderr
