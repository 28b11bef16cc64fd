"""The fetch path over HTTPS, against a local TLS origin whose certificate comes from a CA made for the test run:
verified fetches, resumes, and the internal-address guard on HTTPS connections (refused before TLS, before any
request or token is sent)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dev.devservers import ContentOrigin, write_sample_file
from tests.support.fetching import TIMEOUT, cut_transfer, fetcher_for, resolve_to_loopback
from tests.support.files import files_under, sha256_of
from tests.support.http_servers import start_server
from udemy_dl.errors import FetchError, HostNotAllowedError, TransientError
from udemy_dl.fetch import Fetcher

TOKEN = "origin-token"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    """The test CA's certificate (what a client trusts)."""
    cert: Path
    key: Path
    """The origin's certificate (for 127.0.0.1, localhost and origin.cdn.test) and key."""


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA and a server certificate it signed, made with the openssl command line once per test run."""
    folder = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=udemy_dl test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:origin.cdn.test\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=folder,
    )  # fmt: skip
    return Certificates(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key")


@pytest.fixture
def tls_origin(tmp_path: Path, certificates: Certificates) -> Iterator[ContentOrigin]:
    """An HTTPS origin that answers 401 unless the request carries `Bearer origin-token`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert, certificates.key)
    server = start_server(ContentOrigin(tmp_path / "tls-root", token=TOKEN, tls=context))
    yield server
    server.stop()


@pytest.fixture
def trust_test_ca(monkeypatch: pytest.MonkeyPatch, certificates: Certificates) -> None:
    """Point the fetcher at the test CA the standard way (REQUESTS_CA_BUNDLE)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificates.ca))


@pytest.mark.usefixtures("trust_test_ca")
def test_manifest_course_is_fetched_over_https(tls_origin: ContentOrigin, staging: Path) -> None:
    """A manifest and its files over HTTPS, the certificate verified against the operator's CA: every file in
    place and verified, the token sent on every request."""
    assert tls_origin.base_url.startswith("https://")
    url = tls_origin.add_course("secure", {"a.bin": 1500, "sub/b.bin": 700_000})
    result = fetcher_for(tls_origin, token=TOKEN).fetch(url, staging)
    assert files_under(staging) == ["a.bin", "sub/b.bin"]
    declared = {item["path"]: item["sha256"] for item in tls_origin.manifests["/courses/secure"]["files"]}
    assert {f.path: f.sha256 for f in result.files} == declared
    assert all(sha256_of(staging / f.path) == f.sha256 for f in result.files)
    assert len(tls_origin.requests.entries) == 3
    assert all(headers.get("Authorization") == f"Bearer {TOKEN}" for _, _, headers in tls_origin.requests.entries)


@pytest.mark.usefixtures("trust_test_ca")
def test_single_file_is_fetched_over_https(tls_origin: ContentOrigin, staging: Path) -> None:
    """A single-file course over HTTPS."""
    sha = write_sample_file(tls_origin.root / "files" / "one" / "talk.mp4", 300_000, "one")
    result = fetcher_for(tls_origin, token=TOKEN).fetch(f"{tls_origin.base_url}/files/one/talk.mp4", staging)
    assert [(f.path, f.sha256) for f in result.files] == [("talk.mp4", sha)]


@pytest.mark.usefixtures("trust_test_ca")
def test_interrupted_file_resumes_over_https(tls_origin: ContentOrigin, staging: Path) -> None:
    """A transfer cut mid-file over HTTPS continues with a Range request; no byte is sent twice."""
    url = tls_origin.add_course("cut", {"big.bin": 3_000_000})
    with cut_transfer(tls_origin, "/files/cut/big.bin", 2_000_000):
        fetcher_for(tls_origin, token=TOKEN).fetch(url, staging)
    result = fetcher_for(tls_origin, token=TOKEN).fetch(url, staging)
    assert result.files[0].sha256 == tls_origin.manifests["/courses/cut"]["files"][0]["sha256"]
    assert sha256_of(staging / "big.bin") == result.files[0].sha256
    ranges = [h.get("Range") for _, p, h in tls_origin.requests.entries if p == "/files/cut/big.bin"]
    assert ranges[0] is None and ranges[1] is not None
    resumed_at = int((ranges[1] or "").removeprefix("bytes=").rstrip("-"))
    assert tls_origin.bytes_sent["/files/cut/big.bin"] == 2_000_000 + (3_000_000 - resumed_at)


@pytest.mark.usefixtures("trust_test_ca")
def test_pattern_allowed_host_on_an_internal_address_is_refused_over_https(
    tls_origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard on HTTPS connections: a host allowed only by a `*.` pattern that resolves to an internal address
    is refused once connected, before the TLS handshake and before any request carries the token."""
    port = tls_origin.host_port.rsplit(":", 1)[1]
    tls_origin.add_course("internal", {"a.bin": 10})
    resolve_to_loopback(monkeypatch, "origin.cdn.test")
    fetcher = Fetcher({f"*.cdn.test:{port}"}, token=TOKEN, timeout=TIMEOUT)
    with pytest.raises(HostNotAllowedError, match="internal address"):
        fetcher.fetch(f"https://origin.cdn.test:{port}/courses/internal", staging)
    assert tls_origin.requests.entries == []


@pytest.mark.usefixtures("trust_test_ca")
def test_exactly_listed_host_name_on_an_internal_address_is_allowed_over_https(
    tls_origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same host listed exactly is the operator's consent: fetched, the certificate checked for its name."""
    port = tls_origin.host_port.rsplit(":", 1)[1]
    tls_origin.add_course("listed", {"a.bin": 10})
    resolve_to_loopback(monkeypatch, "origin.cdn.test")
    fetcher = Fetcher({f"origin.cdn.test:{port}"}, token=TOKEN, timeout=TIMEOUT)
    result = fetcher.fetch(f"https://origin.cdn.test:{port}/courses/listed", staging)
    assert [f.path for f in result.files] == ["a.bin"]


def test_certificate_from_an_unknown_ca_is_refused_before_any_request(
    tls_origin: ContentOrigin, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the CA, the origin's certificate does not verify: a transient FetchError, and no request (so no
    token) ever reaches the origin."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    url = tls_origin.add_course("untrusted", {"a.bin": 10})
    with pytest.raises(FetchError, match=r"(?i)certificate") as caught:
        fetcher_for(tls_origin, token=TOKEN).fetch(url, staging)
    assert isinstance(caught.value, TransientError)
    assert tls_origin.requests.entries == []
