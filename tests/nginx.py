"""A test-owned nginx serving the shipped snippet, as the platform's nginx would.

It runs with a ``-p`` prefix in a temporary directory, on a free loopback port, and the one
change to ``config/nginx/healthd.conf`` is where healthd publishes: ``/var/lib/healthd/`` is
replaced by the test's directory.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.daemon import REPO, free_port
from tests.serving import stop_process

__all__ = ["SNIPPET", "Nginx", "nginx_binary"]

SNIPPET = REPO / "config" / "nginx" / "healthd.conf"
_PUBLISHED_DIR = "/var/lib/healthd/"


def nginx_binary() -> str | None:
    """Where nginx is, if installed; /usr/sbin is often missing from a non-root PATH."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class Nginx:
    """nginx listening on ``port`` and serving what healthd publishes in ``published``."""

    def __init__(self, prefix: Path, published: Path) -> None:
        self.port = free_port()
        self.error_log = prefix / "logs" / "error.log"
        (prefix / "logs").mkdir(parents=True)
        (prefix / "tmp").mkdir()
        snippet = SNIPPET.read_text()
        assert f"{_PUBLISHED_DIR}status.json" in snippet
        (prefix / "healthd.conf").write_text(snippet.replace(_PUBLISHED_DIR, f"{published}/"))
        user = "user root;" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {prefix}/tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"""
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
{temp}
    server {{
        listen 127.0.0.1:{self.port};
        include {prefix}/healthd.conf;
    }}
}}
"""
        )
        binary = nginx_binary()
        assert binary is not None
        # -e: even before reading the config, nginx opens an error log; keep it in the prefix.
        command = [binary, "-p", str(prefix), "-e", str(self.error_log)]
        command += ["-c", str(prefix / "nginx.conf")]
        subprocess.run([*command, "-t", "-q"], check=True, capture_output=True)
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.process.poll() is None, self.process.stderr
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.02)

    def url(self, path: str) -> str:
        """The URL of ``path`` on this nginx."""
        return f"http://127.0.0.1:{self.port}{path}"

    def connection(self) -> http.client.HTTPConnection:
        """A new keep-alive connection to this nginx."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def get(
        self,
        path: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a connection of its own: status, headers, body (0 if unreachable)."""
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except OSError:
            return 0, {}, b""
        finally:
            connection.close()

    def close(self) -> None:
        """Stop nginx."""
        stop_process(self.process, timeout_seconds=5)
