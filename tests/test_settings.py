"""Settings: defaults, REDIS_*/DB_* assembly, rejection of bad values, secrets kept out of repr, `.env`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from udemy_dl.errors import ConfigError
from udemy_dl.settings import Settings, get_settings, load_settings, redact_url
from udemy_dl.webhooks import generate_secret

GOOD_SECRET = generate_secret()


def load(**environ: str) -> Settings:
    """Settings from exactly *environ*, with no `.env` file."""
    return load_settings(environ=environ, env_file=None)


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("redis_url", "redis://localhost:6379/0"),
        ("database_url", None),
        ("api_secret_key", None),
        ("content_token", None),
        ("webhook_url", None),
        ("allowed_hosts", frozenset()),
        ("worker_count", 5),
        ("queue_name", "downloads"),
        ("webhook_queue_name", "webhooks"),
        ("max_attempts", 3),
        ("retry_delay", 20),
        ("job_timeout", 3600),
        ("result_ttl", 86_400),
        ("failure_ttl", 604_800),
        ("stop_timeout", 30),
        ("fetch_concurrency", 4),
        ("max_task_bytes", 50 * 1024**3),
        ("fetch_command", None),
        ("reconcile_interval", 300),
        ("origin_concurrency", 0),
        ("fetch_rate_limit", 0),
    ],
)
def test_default_value_when_nothing_is_set(attribute: str, expected: Any) -> None:
    """With an empty environment each setting takes the default the spec's table gives."""
    assert getattr(load(), attribute) == expected


@pytest.mark.parametrize(
    ("attribute", "folder"),
    [("download_dir", "downloads"), ("failed_dir", "failed"), ("log_dir", "logs"), ("pid_dir", "run")],
)
def test_default_folders_are_absolute_under_the_working_directory(attribute: str, folder: str, tmp_path: Path) -> None:
    """DOWNLOAD_DIR and friends default to ./<name>, made absolute against the current directory."""
    value = getattr(load(), attribute)
    assert value == tmp_path / folder
    assert value.is_absolute()


def test_redis_url_overrides_redis_parts() -> None:
    """REDIS_URL wins over REDIS_HOST/PORT/DB/PASSWORD."""
    settings = load(
        REDIS_URL="rediss://cache.example:6380/2",
        REDIS_HOST="ignored.example",
        REDIS_PORT="1234",
        REDIS_DB="9",
        REDIS_PASSWORD="ignored",
    )
    assert settings.redis_url == "rediss://cache.example:6380/2"


def test_redis_parts_build_a_url_with_the_password_quoted() -> None:
    """REDIS_HOST/PORT/DB/PASSWORD make one URL; a password with URL characters survives the round trip."""
    settings = load(REDIS_HOST="cache.example", REDIS_PORT="6390", REDIS_DB="4", REDIS_PASSWORD="p@ss/w:rd")
    parts = urlsplit(settings.redis_url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("redis", "cache.example", 6390, "/4")
    assert unquote(parts.password or "") == "p@ss/w:rd"


def test_db_parts_build_a_mysql_database_url() -> None:
    """DB_HOST/PORT/USER/PASSWORD/NAME make a mysql:// DATABASE_URL (port defaults to 3306)."""
    settings = load(DB_HOST="db.example", DB_USER="shop", DB_PASSWORD="s3cr:t@x", DB_NAME="shop_db")
    assert settings.database_url is not None
    parts = urlsplit(settings.database_url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("mysql", "db.example", 3306, "/shop_db")
    assert (parts.username, unquote(parts.password or "")) == ("shop", "s3cr:t@x")


def test_database_url_overrides_db_parts() -> None:
    """An explicit DATABASE_URL is used as given, DB_* ignored."""
    settings = load(DATABASE_URL="sqlite:////var/lib/x.db", DB_HOST="db.example", DB_USER="u", DB_NAME="n")
    assert settings.database_url == "sqlite:////var/lib/x.db"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"WORKER_COUNT": "abc"}, "WORKER_COUNT"),
        ({"WORKER_COUNT": "0"}, "WORKER_COUNT"),
        ({"MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS"),
        ({"RETRY_DELAY": "-1"}, "RETRY_DELAY"),
        ({"JOB_TIMEOUT": "1.5"}, "JOB_TIMEOUT"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"REDIS_PORT": "sixthousand"}, "REDIS_PORT"),
        ({"DATABASE_URL": "postgres://u@db.example/shop"}, "DATABASE_URL"),
        ({"DB_HOST": "db.example", "DB_NAME": "shop"}, "DB_USER"),
        ({"DB_HOST": "db.example", "DB_USER": "shop"}, "DB_NAME"),
        ({"API_SECRET_KEY": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}, "API_SECRET_KEY"),
        ({"API_SECRET_KEY": "whsec_not*base64!"}, "API_SECRET_KEY"),
        ({"API_SECRET_KEY": "whsec_c2hvcnQ="}, "API_SECRET_KEY"),
        ({"WEBHOOK_URL": "ftp://pay.example/hook"}, "WEBHOOK_URL"),
        ({"ALLOWED_HOSTS": "cdn.example, http://evil.example/path"}, "ALLOWED_HOSTS"),
        ({"QUEUE_NAME": "downloads;flushall"}, "QUEUE_NAME"),
        ({"ALLOWED_HOSTS": "*"}, "ALLOWED_HOSTS"),
        ({"ALLOWED_HOSTS": "cdn.example,*.*:*"}, "ALLOWED_HOSTS"),
        ({"FETCH_CONCURRENCY": "0"}, "FETCH_CONCURRENCY"),
        ({"MAX_TASK_BYTES": "-5"}, "MAX_TASK_BYTES"),
        ({"ORIGIN_CONCURRENCY": "two"}, "ORIGIN_CONCURRENCY"),
        ({"ORIGIN_CONCURRENCY": "-1"}, "ORIGIN_CONCURRENCY"),
        ({"FETCH_RATE_LIMIT": "5MB"}, "FETCH_RATE_LIMIT"),
        ({"FETCH_RATE_LIMIT": "1.5M"}, "FETCH_RATE_LIMIT"),
        ({"FETCH_RATE_LIMIT": "2000T"}, "FETCH_RATE_LIMIT"),
        ({"FETCH_COMMAND": "wget {url}"}, "FETCH_COMMAND"),
        ({"FETCH_COMMAND": "fetch '{url} {dest}"}, "FETCH_COMMAND"),
        ({"RECONCILE_INTERVAL": "soon"}, "RECONCILE_INTERVAL"),
        ({"HORSE_MAX_JOBS": "0"}, "HORSE_MAX_JOBS"),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()),
)
def test_bad_value_raises_config_error_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    """A malformed setting stops start-up with a ConfigError whose message names the variable."""
    with pytest.raises(ConfigError) as caught:
        load(**environ)
    assert caught.value.variable == variable
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "secret"),
    [
        ({"REDIS_URL": "http://user:redis-pw-1@cache.example/0"}, "redis-pw-1"),
        ({"DATABASE_URL": "postgres://shop:db-pw-2@db.example/shop"}, "db-pw-2"),
        ({"API_SECRET_KEY": "whsec_key-material-3"}, "key-material-3"),
    ],
)
def test_config_error_does_not_echo_the_secret(environ: dict[str, str], secret: str) -> None:
    """Messages about bad Redis/database URLs or keys never repeat the password or key."""
    with pytest.raises(ConfigError) as caught:
        load(**environ)
    assert secret not in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "secret"),
    [
        ({"REDIS_PASSWORD": "redis-pw-xyz"}, "redis-pw-xyz"),
        ({"REDIS_URL": "redis://:redis-url-pw@cache.example:6379/0"}, "redis-url-pw"),
        ({"DB_HOST": "db.example", "DB_USER": "u", "DB_NAME": "n", "DB_PASSWORD": "db-pw-xyz"}, "db-pw-xyz"),
        ({"DATABASE_URL": "mysql://u:db-url-pw@db.example/n"}, "db-url-pw"),
        ({"API_SECRET_KEY": GOOD_SECRET}, GOOD_SECRET.removeprefix("whsec_")),
        ({"CONTENT_TOKEN": "origin-token-xyz"}, "origin-token-xyz"),
    ],
    ids=["REDIS_PASSWORD", "REDIS_URL", "DB_PASSWORD", "DATABASE_URL", "API_SECRET_KEY", "CONTENT_TOKEN"],
)
def test_secret_never_appears_in_repr(environ: dict[str, str], secret: str) -> None:
    """repr()/str() of Settings (what ends up in logs and tracebacks) holds no password, key or token."""
    settings = load(**environ)
    assert secret not in repr(settings)
    assert secret not in str(settings)


def test_webhook_url_password_never_appears_in_repr() -> None:
    """A receiver password carried in WEBHOOK_URL stays out of repr(settings)."""
    settings = load(WEBHOOK_URL="https://hook:hook-pw-xyz@pay.example/webhooks")
    assert "hook-pw-xyz" not in repr(settings)


def test_redacted_urls_hide_the_password() -> None:
    """redis_url_redacted / database_url_redacted (used in CLI output) show the user and host but not the password."""
    settings = load(REDIS_URL="redis://:r-pw@cache.example:6379/0", DATABASE_URL="mysql://u:d-pw@db.example/n")
    assert "r-pw" not in settings.redis_url_redacted and "cache.example" in settings.redis_url_redacted
    assert "d-pw" not in settings.database_url_redacted and "u:***@db.example" in settings.database_url_redacted


def test_redact_url_leaves_a_url_without_password_unchanged() -> None:
    """redact_url only rewrites URLs that carry a password."""
    assert redact_url("redis://cache.example:6379/0") == "redis://cache.example:6379/0"


def test_dotenv_file_values_are_read(tmp_path: Path) -> None:
    """A `.env` in the working directory supplies settings the environment does not set."""
    (tmp_path / ".env").write_text("WORKER_COUNT=7\nQUEUE_NAME=from-file\n", encoding="utf-8")
    settings = load_settings(environ={})
    assert (settings.worker_count, settings.queue_name) == (7, "from-file")


def test_environment_wins_over_dotenv_file(tmp_path: Path) -> None:
    """A variable set in both the environment and `.env` takes the environment's value."""
    (tmp_path / ".env").write_text("WORKER_COUNT=7\nQUEUE_NAME=from-file\n", encoding="utf-8")
    settings = load_settings(environ={"WORKER_COUNT": "9"})
    assert (settings.worker_count, settings.queue_name) == (9, "from-file")


def test_bad_value_in_dotenv_file_names_the_variable(tmp_path: Path) -> None:
    """A malformed value read from `.env` is rejected like one from the environment."""
    env_file = tmp_path / "service.env"
    env_file.write_text("MAX_ATTEMPTS=zero\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="MAX_ATTEMPTS"):
        load_settings(environ={}, env_file=env_file)


def test_allowed_hosts_are_trimmed_and_lowercased() -> None:
    """ALLOWED_HOSTS is a comma list; blanks are dropped, names lowercased."""
    assert load(ALLOWED_HOSTS=" CDN.example , ,cdn2.example:8443,").allowed_hosts == frozenset(
        {"cdn.example", "cdn2.example:8443"}
    )


def test_fetch_command_is_split_like_a_shell_but_never_run_by_one() -> None:
    """FETCH_COMMAND becomes an argument list (quotes respected) keeping the {url} and {dest} placeholders."""
    settings = load(FETCH_COMMAND="/opt/dl --out '{dest}' --name 'my course' {url}")
    assert settings.fetch_command == ("/opt/dl", "--out", "{dest}", "--name", "my course", "{url}")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("2000000", 2_000_000), ("500K", 500_000), ("500k", 500_000), ("5M", 5_000_000), ("1G", 10**9), ("0", 0)],
)
def test_fetch_rate_limit_takes_a_k_m_or_g_suffix(raw: str, expected: int) -> None:
    """FETCH_RATE_LIMIT is bytes per second, in digits with an optional decimal K, M or G."""
    assert load(FETCH_RATE_LIMIT=raw).fetch_rate_limit == expected


def test_generated_secret_is_accepted() -> None:
    """gen-secret's output is a valid API_SECRET_KEY."""
    secret = generate_secret()
    assert load(API_SECRET_KEY=secret).api_secret_key == secret


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"ALLOWED_HOSTS": "cdn.example"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:////tmp/x.db"}, "ALLOWED_HOSTS"),
        (
            {"DATABASE_URL": "sqlite:////tmp/x.db", "ALLOWED_HOSTS": "cdn.example", "WEBHOOK_URL": "http://pay/x"},
            "API_SECRET_KEY",
        ),
    ],
    ids=["no-database", "no-allowed-hosts", "webhook-without-key"],
)
def test_worker_readiness_names_the_missing_variable(environ: dict[str, str], variable: str) -> None:
    """require_worker_ready refuses a worker start-up without what a download needs, naming it."""
    with pytest.raises(ConfigError) as caught:
        load(**environ).require_worker_ready()
    assert caught.value.variable == variable


def test_get_settings_is_parsed_once_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_settings() caches one Settings per process; cache_clear() picks up a changed environment."""
    monkeypatch.setenv("WORKER_COUNT", "2")
    first = get_settings()
    monkeypatch.setenv("WORKER_COUNT", "4")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().worker_count == 4


def test_every_variable_read_is_listed_in_variables() -> None:
    """settings.VARIABLES names every variable load_settings reads (tests and tools rely on it)."""
    import inspect
    import re

    from udemy_dl import settings as module

    source = inspect.getsource(module)
    read = set(re.findall(r'_(?:get|int|path|name|command|intervals|sentinels)\(env, "([A-Z_]+)"', source))
    read |= {"REDIS_URL", "DATABASE_URL", "ALLOWED_HOSTS", "WEBHOOK_URL", "API_SECRET_KEY"}
    assert read <= set(module.VARIABLES), sorted(read - set(module.VARIABLES))
    assert len(module.VARIABLES) == len(set(module.VARIABLES))


# -- URLs and typed values are checked whole at load (a bad value never reaches redis-py or the store)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:6379/ten"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/-1"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/1/2"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:abc/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:70000/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:0/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis:///0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache example/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://[not-ipv6]:6379/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache.example/0#x"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache.example/0?db=ten"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache.example/0?colour=blue"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache.example/?socket_timeout=soon"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache.example/0?ssl_ca_certs=/etc/ca.pem"}, "REDIS_URL"),
        ({"REDIS_URL": "REDIS://cache.example/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis:/cache.example/0"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://cache.example/run/redis.sock"}, "REDIS_URL"),
        ({"REDIS_URL": "unix:///run/redis.sock?db=x"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache.example/0", "REDIS_SENTINELS": "s1:26379", "REDIS_DB": "x"}, "REDIS_DB"),
        ({"REDIS_URL": "unix:///run/redis.sock", "REDIS_SENTINELS": "s1:26379"}, "REDIS_URL"),
        ({"REDIS_PORT": "70000"}, "REDIS_PORT"),
        ({"REDIS_PORT": "6379x"}, "REDIS_PORT"),
        ({"REDIS_URL": "redis://cache.example/0", "REDIS_PORT": "abc"}, "REDIS_PORT"),
        ({"REDIS_DB": "ten"}, "REDIS_DB"),
        ({"REDIS_DB": "-1"}, "REDIS_DB"),
        ({"REDIS_HOST": "cache.example/0"}, "REDIS_HOST"),
        ({"REDIS_HOST": "user@cache.example"}, "REDIS_HOST"),
        ({"REDIS_HOST": "cache.example:6379"}, "REDIS_HOST"),
        ({"REDIS_SENTINELS": "bad host:26379"}, "REDIS_SENTINELS"),
        ({"DATABASE_URL": "mysql://u:p@db.example:abc/shop"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u:p@db.example:99999/shop"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u:p@db.example/"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u:p@db.example"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u:p@/shop"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://db.example/shop"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u@db.example/shop/more"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u@db.example/shop?charset=latin1"}, "DATABASE_URL"),
        ({"DATABASE_URL": "mysql://u@db.example/shop#x"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite://"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:///"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite://db.example/tasks.db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite:tasks.db"}, "DATABASE_URL"),
        ({"DB_HOST": "db.example", "DB_USER": "u", "DB_NAME": "shop", "DB_PORT": "65536"}, "DB_PORT"),
        ({"DB_PORT": "abc"}, "DB_PORT"),
        ({"DB_HOST": "db example", "DB_USER": "u", "DB_NAME": "shop"}, "DB_HOST"),
        ({"DB_HOST": "db.example", "DB_USER": "u", "DB_NAME": "shop/x"}, "DB_NAME"),
        ({"WEBHOOK_URL": "https://pay.example:abc/hook"}, "WEBHOOK_URL"),
        ({"WEBHOOK_URL": "https:///hook"}, "WEBHOOK_URL"),
        ({"WORKER_COUNT": "1_000"}, "WORKER_COUNT"),
        ({"WORKER_COUNT": "\u0663"}, "WORKER_COUNT"),
        ({"STOP_TIMEOUT": "99999999999999999999"}, "STOP_TIMEOUT"),
        ({"WEBHOOK_RETRY_INTERVALS": "10,\u0663"}, "WEBHOOK_RETRY_INTERVALS"),
        ({"QUEUE_NAME": "t\u00e2ches"}, "QUEUE_NAME"),
        ({"LOG_DIR": "/var/log/udemy\ndl"}, "LOG_DIR"),
        ({"PID_DIR": __file__}, "PID_DIR"),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v!r}" for k, v in value.items()),
)
def test_malformed_value_is_refused_at_load(environ: dict[str, str], variable: str) -> None:
    """A URL, port, database number, host, count or folder that is malformed (or would silently mean
    something else, like `redis://…/ten` meaning db 0) is a ConfigError naming its variable at load."""
    with pytest.raises(ConfigError) as caught:
        load(**environ)
    assert caught.value.variable == variable, str(caught.value)
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/15",
        "redis://:p%2Fw@cache.example:6379/0",
        "redis://user:p%40ss@cache.example/3",
        "redis://cache.example",
        "redis://cache.example/",
        "rediss://:PASSWORD@redis.internal:6380/0?ssl_ca_certs=/etc/ssl/certs/redis-ca.pem",
        "rediss://cache.example/0?ssl_cert_reqs=required&ssl_check_hostname=true",
        "redis://[::1]:6379/2",
        "redis://cache.example/0?socket_timeout=2.5&health_check_interval=10",
        "unix:///run/redis/redis.sock?db=0",
        "unix://:pw@/run/redis/redis.sock",
    ],
)
def test_well_formed_redis_url_is_accepted(url: str) -> None:
    """Every form the docs show keeps working."""
    assert load(REDIS_URL=url).redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root@127.0.0.1:3306/udemy_dl_test",
        "mysql://shop:s3cr%2Ft@db.example/shop_db",
        "mysql://shop@[::1]/shop",
        "sqlite:////var/lib/udemy_dl/tasks.db",
        "sqlite:///./udemy_dl.sqlite3",
        "sqlite:///relative/tasks.db",
    ],
)
def test_well_formed_database_url_is_accepted(url: str) -> None:
    assert load(DATABASE_URL=url).database_url == url


def test_redis_url_database_number_is_used() -> None:
    """The database number is part of the URL redis-py is given, not dropped."""
    from redis import Redis

    for url, db in (("redis://cache.example:6379/7", 7), ("unix:///run/redis.sock?db=4", 4)):
        client = Redis.from_url(load(REDIS_URL=url).redis_url)
        assert client.connection_pool.connection_kwargs["db"] == db


def test_redis_host_ipv6_is_bracketed() -> None:
    """REDIS_HOST=::1 makes redis://[::1]:6379/0, not an unparseable redis://::1:6379/0."""
    assert load(REDIS_HOST="::1").redis_url == "redis://[::1]:6379/0"
    url = load(DB_HOST="::1", DB_USER="u", DB_NAME="n").database_url
    assert url is not None and urlsplit(url).hostname == "::1"


# -- passwords with characters that mean something in a URL --------------------------------------


@pytest.mark.parametrize(
    ("url", "password", "shown"),
    [
        ("redis://:s3c/ret@cache.example:6379/0", "s3c/ret", "cache.example:6379/0"),
        ("redis://:s3c#ret@cache.example:6379/0", "s3c#ret", "cache.example:6379/0"),
        ("redis://:s3c?ret@cache.example:6379/0", "s3c?ret", "cache.example:6379/0"),
        ("redis://user:a/b?c#d@e@cache.example/0", "a/b?c#d@e", "cache.example/0"),
        ("mysql://shop:pw/x@db.example:3306/shop", "pw/x", "db.example:3306/shop"),
        ("mysql://shop:p:w@db.example/shop", "p:w", "db.example/shop"),
        ("unix://:p/w@/run/redis.sock", "p/w", "/run/redis.sock"),
        ("https://hook:h?k/w@pay.example/hook", "h?k/w", "pay.example/hook"),
    ],
)
def test_redact_url_hides_a_password_holding_url_characters(url: str, password: str, shown: str) -> None:
    """The userinfo runs from `://` to the last `@` before the host, whatever `/`, `?` or `#` it holds."""
    redacted = redact_url(url)
    for piece in {password, *(part for part in re.split(r"[/?#@:]", password) if len(part) >= 2)}:
        assert piece not in redacted, redacted
    assert redacted.endswith("***@" + shown), redacted


@pytest.mark.parametrize(
    "url",
    ["redis://:pw-x@bad host/0", "user:pw-x@cache.example", "redis://:pw-x@cache\\evil/0", "redis://:pw-x@ca\nche/0"],
)
def test_redact_url_redacts_everything_it_cannot_parse(url: str) -> None:
    """A URL that cannot be parsed with confidence shows its scheme at most."""
    redacted = redact_url(url)
    assert "pw-x" not in redacted and "cache" not in redacted, redacted


def test_redact_url_hides_a_password_in_the_query() -> None:
    """redis-py also takes the password from `?password=`; one holding `@` must not pass for a user name."""
    redacted = redact_url("redis://cache.example/0?password=q-pw-1&db=2")
    assert "q-pw-1" not in redacted and "db=2" in redacted
    for url in ("redis://cache.example/0?password=q-pw@2", "mysql://u@db.example/x?password=q-pw@3&a=1"):
        redacted = redact_url(url)
        assert "q-pw" not in redacted, redacted


@pytest.mark.parametrize(
    ("variable", "url", "password"),
    [
        ("REDIS_URL", "redis://:s3c/ret@127.0.0.1:6379/0", "s3c/ret"),
        ("REDIS_URL", "redis://:s3c#ret@127.0.0.1:6379/0", "s3c#ret"),
        ("REDIS_URL", "rediss://u:s3c?ret@127.0.0.1:6379/0", "s3c?ret"),
        ("DATABASE_URL", "mysql://shop:s3c/ret@db.example/shop", "s3c/ret"),
        ("DATABASE_URL", "mysql://shop:s3c#ret@db.example/shop", "s3c#ret"),
        ("WEBHOOK_URL", "https://hook:s3c/ret@pay.example/hook", "s3c/ret"),
    ],
)
def test_unencoded_url_characters_in_a_password_are_refused_without_echo(
    variable: str, url: str, password: str
) -> None:
    """A password with an unencoded `/`, `?` or `#` would be read as part of the host, port or path:
    it is refused, naming the variable and the fix, and the message holds no part of the password."""
    with pytest.raises(ConfigError) as caught:
        load(**{variable: url})
    message = str(caught.value)
    assert caught.value.variable == variable
    assert "percent-encode" in message
    for piece in re.split(r"[/?#]", password):
        assert piece not in message, message


def test_at_sign_in_a_password_is_used_as_given() -> None:
    """An unencoded `@` is unambiguous (the host follows the last one): accepted, and the password arrives whole."""
    from redis import Redis

    settings = load(REDIS_URL="redis://:p@ss@cache.example:6379/0")
    kwargs = Redis.from_url(settings.redis_url).connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["host"], kwargs["db"]) == ("p@ss", "cache.example", 0)
    assert "p@ss" not in settings.redis_url_redacted
