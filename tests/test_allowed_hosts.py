"""ALLOWED_HOSTS entries: host, host:port, [IPv6]:port or `*.domain[:port]`; nothing that would allow every host."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udemy_dl.errors import ConfigError
from udemy_dl.safety import match_allowed, parse_allowed_entry
from udemy_dl.settings import Settings, load_settings


def load(**environ: str) -> Settings:
    """Settings from exactly *environ*, with no `.env` file."""
    return load_settings(environ=environ, env_file=None)


@pytest.mark.parametrize(
    "entry",
    [
        "*",
        "**",
        "*.*",
        "*.*:*",
        "*:443",
        "*:*",
        "?*",
        "*?",
        "?",
        "[a-z]*",
        "[!x]*",
        "*.com",
        "*.localhost",
        "*.[a-z]*",
        "cdn.*",
        "cdn-*.example.com",
        "*cdn.example.com",
        "*.cdn.example.com:*",
        "*.*.example.com",
        "*.127.0.0.1",
        "*.[::1]",
    ],
)
def test_pattern_that_allows_too_much_is_refused_naming_it(entry: str) -> None:
    """Only a leading `*.` label over a domain of two labels or more is a pattern; anything else is refused."""
    with pytest.raises(ConfigError) as caught:
        load(ALLOWED_HOSTS=f"cdn.example,{entry}")
    assert caught.value.variable == "ALLOWED_HOSTS"
    assert repr(entry) in str(caught.value)


@pytest.mark.parametrize(
    "entry",
    [
        ":443",
        "cdn.example:",
        "cdn.example:0",
        "cdn.example:65536",
        "cdn.example:https",
        "cdn.example:+443",
        "::1",
        "[::1",
        "[fe80::1%eth0]:80",
        "[cdn.example]:80",
        "cdn..example",
        "-",
        "cdn.example%2f",
        "cdn_example\\x",
        "0x7f.1",
        "127.1",
        "2130706433",
        "1.2.3.4.5",
        "user@cdn.example",
        "https://cdn.example",
        "cdn.example/path",
        "cdn.example?x",
        "cdn.example#x",
        "a" * 64 + ".example",
    ],
)
def test_malformed_entry_is_refused_naming_it(entry: str) -> None:
    """Bad ports, unbracketed IPv6, zone ids, empty labels, non-canonical IPv4, URLs: refused with the value shown."""
    with pytest.raises(ConfigError) as caught:
        load(ALLOWED_HOSTS=entry)
    assert caught.value.variable == "ALLOWED_HOSTS"
    assert repr(entry) in str(caught.value)


@pytest.mark.parametrize("entry", ["cdn\x00.example", "cdn.example\x7f", "cdn\u2028.example", "cdn\u200b.example"])
def test_entry_with_control_characters_is_refused_shown_with_repr(entry: str) -> None:
    """Control and format characters inside an entry are refused and shown escaped."""
    with pytest.raises(ConfigError) as caught:
        load(ALLOWED_HOSTS=entry)
    assert repr(entry) in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "stored"),
    [
        ("cdn.example", "cdn.example"),
        ("CDN.Example.", "cdn.example"),
        ("cdn.example:8443", "cdn.example:8443"),
        ("*.CDN.example.com", "*.cdn.example.com"),
        ("*.cdn.example.com:8443", "*.cdn.example.com:8443"),
        ("localhost:8080", "localhost:8080"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[0:0::1]:9000", "[::1]:9000"),
        ("[::1]", "[::1]"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
    ],
)
def test_good_entry_is_stored_in_its_canonical_form(entry: str, stored: str) -> None:
    """Entries are lowercased, IDNA-encoded (what requests connects to), IPv6 canonical, one trailing dot dropped."""
    assert load(ALLOWED_HOSTS=f" {entry} ,").allowed_hosts == frozenset({stored})


@pytest.mark.parametrize(
    "entry", ["cdn.example", "*.cdn.example.com", "*.cdn.example.com:8443", "127.0.0.1:8080", "[::1]:9000"]
)
@pytest.mark.parametrize(
    "probe",
    ["evil.example", "cdn.example.evil.example", "evilcdn.example.com", "10.0.0.1", "::2", "localhost", "com", "x"],
)
@pytest.mark.parametrize("port", [80, 443, 8080, 8443, 9000])
def test_accepted_entry_matches_no_unrelated_host(entry: str, probe: str, port: int) -> None:
    """A stored entry never matches a host outside its own name (or, for a pattern, outside its domain)."""
    stored = str(parse_allowed_entry(entry))
    assert match_allowed(probe, port, {stored}) is None


def test_pattern_allows_subdomains_at_any_depth_only() -> None:
    """`*.cdn.example.com` allows eu.cdn.example.com and a.b.cdn.example.com, never cdn.example.com itself."""
    hosts = {str(parse_allowed_entry("*.cdn.example.com"))}
    assert match_allowed("eu.cdn.example.com", 443, hosts) == "pattern"
    assert match_allowed("a.b.cdn.example.com", 443, hosts) == "pattern"
    assert match_allowed("cdn.example.com", 443, hosts) is None


entry_text = st.text(max_size=30) | st.lists(
    st.sampled_from(["*", "*.", ".", "?", "[", "]", "a-z", "!", ":", ":443", "cdn", "example", "com", "ü", "0", "1"]),
    max_size=8,
).map("".join)
probe_host = st.from_regex(r"[a-z0-9-]{1,8}(\.[a-z0-9-]{1,8}){0,3}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(entry=entry_text, host=probe_host, port=st.integers(min_value=1, max_value=65535))
def test_any_entry_is_refused_by_config_error_or_allows_only_its_own_domain(entry: str, host: str, port: int) -> None:
    """Every value gives a ConfigError naming ALLOWED_HOSTS, or entries that re-read the same and allow no
    host but the entry's own name (or, for a `*.` pattern, names under its domain)."""
    try:
        hosts = load(ALLOWED_HOSTS=entry).allowed_hosts
    except ConfigError as exc:
        assert exc.variable == "ALLOWED_HOSTS"
        return
    for stored in hosts:
        parsed = parse_allowed_entry(stored)
        assert str(parsed) == stored
        if match_allowed(host, port, {stored}):
            assert host == parsed.host or (parsed.pattern and host.endswith("." + parsed.host)), (entry, host)
