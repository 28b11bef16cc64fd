"""Local HTTP origins on loopback: nginx (fast, so the link is not the bottleneck) or the project's ContentOrigin.

Both serve the same tree: `files/...` as static files and `courses/<name>.json` manifests as
application/json. Each can say, per path, which requests it answered (status, Range asked for)
and how many body bytes it sent, which is how part (b) counts bytes fetched twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dev.devservers import ContentOrigin

from .support import BenchError, Child, Children, free_port, port_open, say, wait_until

NGINX_PACKAGES = ("nginx-light", "nginx")
"""Debian packages that bring an nginx binary, smallest first (nginx-light is gone after Debian 12)."""


@dataclass(frozen=True)
class Served:
    path: str
    status: int | None
    """HTTP status, where the origin records it (nginx does; ContentOrigin does not)."""
    range: str | None
    sent: int | None
    """Body bytes sent for this request, where the origin records it per request (nginx)."""


def write_manifest(root: Path, name: str, manifest: dict[str, Any]) -> str:
    """Write a manifest as a static file; return its URL path."""
    target = root / "courses" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(manifest), encoding="utf-8")
    return f"/courses/{name}.json"


# -- nginx ----------------------------------------------------------------------------------------


def find_nginx(install: bool) -> str | None:
    """The nginx binary; installed from Debian's packages when missing and allowed (root, apt-get)."""
    packaged = "/usr/sbin/nginx"  # not on a non-root user's PATH
    found = shutil.which("nginx") or (packaged if os.access(packaged, os.X_OK) else None)
    if found or not install:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    pid_file = Path("/run/nginx.pid")
    had_system_nginx = pid_file.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ("install", "update-then-install"):
        if attempt == "update-then-install":
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False, timeout=300)
        for package in NGINX_PACKAGES:
            say(f"nginx not found: installing Debian's {package} (apt-get install)")
            done = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                env=env,
                capture_output=True,
                check=False,
                timeout=600,
            )
            if done.returncode == 0:
                if pid_file.exists() and not had_system_nginx:
                    # The package started the system's nginx (no policy-rc.d): leave the machine as found.
                    subprocess.run(["nginx", "-s", "stop"], capture_output=True, check=False, timeout=30)
                return shutil.which("nginx") or "/usr/sbin/nginx"
    return None


class NginxOrigin:
    """nginx in the foreground on 127.0.0.1:<free port>, its config, logs and temp files in *workdir*."""

    kind = "nginx"
    slow_rate_mb = 100
    """Bytes per second (in MB) of the rate-limited /slow/ location: about a 1 Gbit/s link."""

    def __init__(self, children: Children, binary: str, root: Path, workdir: Path) -> None:
        self.children = children
        self.binary = binary
        self.root = root
        self.workdir = workdir
        self.port = free_port()
        self.access_log = workdir / "access.log"
        self.child: Child | None = None
        self.version = ""

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host_port}"

    def _config(self) -> str:
        work = self.workdir
        user = "user root root;" if os.geteuid() == 0 else ""  # workers must read the temp tree, wherever it is
        temp_paths = " ".join(
            f"{kind}_temp_path {work / ('temp-' + kind)};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""
{user}
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format bench '$uri $status $body_bytes_sent "$http_range"';
    access_log {self.access_log} bench;
    {temp_paths}
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        location / {{ }}
        location /slow/ {{
            alias {self.root}/;
            limit_rate {self.slow_rate_mb * 10**6};
        }}
    }}
}}
"""

    def start(self) -> NginxOrigin:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nginx.conf"
        config.write_text(self._config(), encoding="utf-8")
        self.version = subprocess.run([self.binary, "-v"], capture_output=True, text=True, check=False).stderr.strip()
        probe = self.root / "files" / ".probe"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        self.child = self.children.start(
            "nginx",
            [self.binary, "-p", f"{self.workdir}/", "-c", str(config), "-e", str(self.workdir / "error.log")],
            self.workdir / "nginx.out",
        )
        child = self.child
        wait_until(
            lambda: port_open(self.port) or not child.alive(),
            timeout=15,
            what="nginx to listen",
        )
        if not child.alive():
            error_log = self.workdir / "error.log"
            detail = error_log.read_text(errors="replace") if error_log.is_file() else ""
            raise BenchError(f"nginx did not start:\n{child.tail()}\n{detail}")
        with urllib.request.urlopen(f"{self.base_url}/files/.probe", timeout=5) as response:  # noqa: S310 (loopback)
            if response.read() != b"ok":
                raise BenchError("nginx answered the probe with something else")
        probe.unlink()
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.children.stop(self.child, timeout=10)
            self.child = None

    def publish_manifest(self, name: str, manifest: dict[str, Any]) -> str:
        return self.base_url + write_manifest(self.root, name, manifest)

    def _lines(self) -> list[Served]:
        try:
            text = self.access_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        served = []
        for line in text.splitlines():
            head, _, quoted = line.partition(' "')
            parts = head.split()
            if len(parts) != 3:
                continue
            path, status, sent = parts
            value = quoted.rstrip('"')
            served.append(Served(path, int(status), None if value in ("", "-") else value, int(sent)))
        return served

    def requests(self, path: str) -> list[Served]:
        return [item for item in self._lines() if item.path == path]

    def total_sent(self, path: str) -> int:
        return sum(item.sent or 0 for item in self.requests(path))


# -- the project's own ContentOrigin ----------------------------------------------------------------


class PythonOrigin:
    """dev.devservers.ContentOrigin (Python's http.server) serving the same tree; slow, but it can cut."""

    kind = "ContentOrigin (python http.server)"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.origin = ContentOrigin(root)
        self.version = "dev.devservers.ContentOrigin"

    @property
    def host_port(self) -> str:
        return self.origin.host_port

    @property
    def base_url(self) -> str:
        return self.origin.base_url

    def start(self) -> PythonOrigin:
        self.origin.start()
        return self

    def publish_manifest(self, name: str, manifest: dict[str, Any]) -> str:
        """ContentOrigin serves manifests from memory (as application/json), not from the tree."""
        return self.origin.set_manifest(write_manifest(self.root, name, manifest), manifest)

    def stop(self) -> None:
        self.origin.stop()

    def requests(self, path: str) -> list[Served]:
        with self.origin.requests.lock:
            entries = list(self.origin.requests.entries)
        return [Served(p, None, headers.get("Range"), None) for _, p, headers in entries if p == path]

    def total_sent(self, path: str) -> int:
        with self.origin.lock:
            return self.origin.bytes_sent.get(path, 0)
