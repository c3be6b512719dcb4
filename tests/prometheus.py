"""A real Prometheus on loopback that scrapes real ``healthd run`` instances.

It scrapes with the shipped scrape snippet (targets and intervals substituted) and evaluates
the shipped rule files every second. ``for:`` durations are the one thing changed, shortened
mechanically to 2 s so that alerts fire within a test; expressions, labels and annotations are
the real ones.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.daemon import REPO, free_port
from tests.serving import stop_process

__all__ = ["ALERT_RULES", "SLO_RULES", "Prometheus"]

ALERT_RULES = REPO / "config" / "prometheus" / "healthd.rules.yml"
SLO_RULES = REPO / "config" / "prometheus" / "healthd.slo.rules.yml"
_SCRAPE = REPO / "config" / "prometheus" / "scrape.yml"


class Prometheus:
    """Prometheus scraping the healthds on ``healthd_ports`` every second, with ``rules``.

    ``shortened`` counts the ``for:`` durations it shortened to 2 s.
    """

    def __init__(self, directory: Path, healthd_ports: Sequence[int], rules: Path) -> None:
        self.port = free_port()
        text, self.shortened = re.subn(r"(?m)^(\s+)for: \S+$", r"\1for: 2s", rules.read_text())
        (directory / rules.name).write_text(text)
        scrape = _SCRAPE.read_text()
        targets = '", "'.join(f"127.0.0.1:{port}" for port in healthd_ports)
        scrape = scrape.replace("127.0.0.1:9469", targets)
        scrape = scrape.replace("scrape_interval: 15s", "scrape_interval: 1s")
        scrape = scrape.replace("scrape_timeout: 5s", "scrape_timeout: 1s")
        assert f'["{targets}"]' in scrape
        (directory / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {directory / rules.name}\n{scrape}"
        )
        self._log = (directory / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_until(lambda: self._get("/-/ready") == b"Prometheus Server is Ready.\n")

    def _get(self, path: str) -> Any:
        """The JSON answer (the raw body if it is not JSON), or ``None`` when unreachable."""
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read()
        except OSError:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now; an invalid query fails the test."""
        answer = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if answer is None:
            return []
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def label_values(self, label: str, match: str) -> list[str]:
        """The values of ``label`` on the series ``match`` selects."""
        answer = self._get(
            f"/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
        )
        return list(answer["data"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """Pending and firing alerts named ``name``."""
        answer = self._get("/api/v1/alerts")
        alerts = [] if answer is None else answer["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == name]

    def wait_until(self, condition: Callable[[], Any], timeout_seconds: float = 30) -> Any:
        """Poll ``condition`` until it is truthy and return what it returned."""
        deadline = time.monotonic() + timeout_seconds
        while not (result := condition()):
            assert self.process.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, f"condition not met in {timeout_seconds} s"
            time.sleep(0.1)
        return result

    def stop(self) -> None:
        """Terminate Prometheus (kill it if it lingers)."""
        stop_process(self.process)
        self._log.close()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
