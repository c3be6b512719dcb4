"""The status page in a real headless Chromium, served by a real nginx with the shipped snippet,
reading the files a real ``healthd run`` writes. Screenshots at desktop and phone widths are
kept in the test's directory (and in $HEALTHD_SCREENSHOTS when set, for a human to look at)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from healthd import web
from tests.browser import Browser, chromium_binary
from tests.daemon import (
    Healthd,
    daemon_settings,
    free_port,
    healthd_cli,
    running_healthd,
    write_config,
)
from tests.http_target import HttpTarget, Reply
from tests.nginx import Nginx, nginx_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed"),
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed"),
]


@dataclass
class _Site:
    healthd: Healthd
    nginx: Nginx
    directory: Path
    target: HttpTarget

    def status(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads((self.directory / "status.json").read_text())
        return doc


def _settings(directory: Path, **extra: str) -> dict[str, str]:
    return daemon_settings(directory, interval="1s", timeout="800ms", **extra)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    with Browser(tmp_path_factory.mktemp("chromium") / "profile") as opened:
        yield opened


@pytest.fixture(scope="module")
def _module_site(
    tmp_path_factory: pytest.TempPathFactory, http_target_server: HttpTarget
) -> Iterator[_Site]:
    """A full-detail site: an http component that tests flip, a refused tcp one, a slow one."""
    tmp_path = tmp_path_factory.mktemp("site")
    http_target = http_target_server
    http_target.reset()
    directory = tmp_path / "state"
    installed = healthd_cli("web", "install", str(directory))
    assert installed.returncode == 0, installed.stderr
    http_target.route("/slow", Reply(delay_seconds=0.1))
    config = write_config(
        tmp_path / "healthd.toml",
        _settings(directory),
        {
            "api": {"kind": "http", "url": http_target.url("/health"), "critical": True,
                    "failure_threshold": 1, "recovery_threshold": 1},
            "cache": {"kind": "tcp", "address": f"127.0.0.1:{free_port()}"},
            "search": {"kind": "http", "url": http_target.url("/slow"),
                       "degraded_latency": "50ms"},
        },
    )  # fmt: skip
    with running_healthd(config, ready=True) as healthd:
        nginx = Nginx(tmp_path / "nginx", directory)
        try:
            yield _Site(healthd, nginx, directory, http_target)
        finally:
            nginx.close()
            http_target.reset()


@pytest.fixture
def site(_module_site: _Site) -> Iterator[_Site]:
    """The module's site, with its target answering as at the start."""
    yield _module_site
    _module_site.target.default = Reply()
    _module_site.target.route("/health", Reply())


def _page_state(browser: Browser) -> dict[str, object]:
    state: dict[str, object] = browser.evaluate(
        """(() => ({
            banner: document.getElementById('banner').dataset.status,
            verdict: document.getElementById('verdict').textContent,
            components: Object.fromEntries([...document.querySelectorAll('#components > li')]
              .map(li => [li.dataset.component, {
                 status: li.dataset.status,
                 badge: li.querySelector('.badge').textContent,
                 reason: li.querySelector('.reason').textContent,
                 since: li.querySelector('.component-since').textContent,
                 bars: li.querySelectorAll('.bar').length}])),
            incidents: [...document.querySelectorAll('#incidents > li')].map(li => li.textContent),
            noHistory: !document.getElementById('no-history').hidden,
            refreshed: Number(document.body.dataset.refreshed || 0),
            width: document.documentElement.scrollWidth,
        }))()"""
    )
    return state


def _screenshot(browser: Browser, tmp_path: Path, name: str) -> Path:
    path = browser.screenshot(tmp_path / f"{name}.png")
    if keep := os.environ.get("HEALTHD_SCREENSHOTS"):
        shutil.copy(path, Path(keep) / path.name)
    assert path.stat().st_size > 5000
    return path


def _wait_for_statuses(site: _Site, expected: dict[str, str]) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        doc = site.status()
        components = doc["components"]
        assert isinstance(components, dict)
        if {n: c["status"] for n, c in components.items()} == expected:
            return doc
        assert time.monotonic() < deadline, f"status never became {expected}: {doc}"
        time.sleep(0.05)


def test_every_component_appears_with_its_status_at_desktop_and_phone_width(
    browser: Browser, site: _Site, tmp_path: Path
) -> None:
    site.target.default = Reply(status=503)
    _wait_for_statuses(site, {"api": "unhealthy", "cache": "unhealthy", "search": "degraded"})
    site.target.default = Reply()
    doc = _wait_for_statuses(site, {"api": "healthy", "cache": "unhealthy", "search": "degraded"})
    # history.json has the api incident once the writer has caught up.
    deadline = time.monotonic() + 10
    while not json.loads((site.directory / "history.json").read_text())["components"]["api"][
        "incidents"
    ]:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    browser.resize(1280, 900)
    browser.open(site.nginx.url("/status/"))
    browser.wait_until("document.body.dataset.refreshed >= 1")
    state = _page_state(browser)
    _screenshot(browser, tmp_path, "status-desktop")

    # cache is not critical: unhealthy makes the verdict degraded, not down.
    assert state["banner"] == doc["status"] == "degraded"
    assert "Some systems are degraded" in str(state["verdict"])
    components = state["components"]
    assert isinstance(components, dict)
    assert set(components) == {"api", "cache", "search"}
    for name, expected in (("api", "Healthy"), ("cache", "Unhealthy"), ("search", "Degraded")):
        shown = components[name]
        assert shown["status"] == expected.lower()
        assert expected in shown["badge"], "the status is written, not only coloured"
        assert shown["bars"] == 90
        assert shown["since"].startswith("since 20")
    assert "connection_refused: connect to 127.0.0.1" in components["cache"]["reason"]
    assert "slow" in components["search"]["reason"]
    incidents = state["incidents"]
    assert isinstance(incidents, list)
    assert any(i.startswith("api") and "http_status" in i for i in incidents)
    assert state["noHistory"] is False
    assert browser.console_errors() == []

    browser.resize(375, 812, mobile=True)
    browser.open(site.nginx.url("/status/"))
    browser.wait_until("document.body.dataset.refreshed >= 1")
    _screenshot(browser, tmp_path, "status-phone")
    phone = _page_state(browser)
    assert phone["width"] == 375, "nothing sticks out sideways at phone width"
    # The same components and statuses; a reason may have moved on by a millisecond meanwhile.
    steady = ("status", "badge", "bars", "since")
    assert {
        name: {key: shown[key] for key in steady} for name, shown in phone["components"].items()
    } == {name: {key: shown[key] for key in steady} for name, shown in components.items()}
    assert "slow" in phone["components"]["search"]["reason"]
    browser.resize(1280, 900)


def test_a_flipped_target_shows_within_one_refresh(browser: Browser, site: _Site) -> None:
    browser.open(site.nginx.url("/status/?refresh=2"))
    browser.wait_until("document.body.dataset.refreshed >= 1")
    assert browser.evaluate("window.healthdStatusPage.defaultRefreshSeconds") == 15
    assert browser.evaluate("window.healthdStatusPage.refreshSeconds") == 2
    _wait_for_statuses(site, {"api": "healthy", "cache": "unhealthy", "search": "degraded"})
    browser.wait_until("document.querySelector('[data-component=api]').dataset.status == 'healthy'")

    site.target.route("/health", Reply(status=500))
    _wait_for_statuses(site, {"api": "unhealthy", "cache": "unhealthy", "search": "degraded"})
    written = time.monotonic()
    browser.wait_until(
        "document.querySelector('[data-component=api]').dataset.status == 'unhealthy'", timeout=5
    )
    # One refresh (2 s here), plus a little for the fetch and the redraw.
    assert time.monotonic() - written < 2 + 1.0
    assert "http_status" in str(_page_state(browser)["components"])


def test_the_keyboard_reaches_the_bars_and_shows_their_tooltip(
    browser: Browser, site: _Site
) -> None:
    browser.open(site.nginx.url("/status/"))
    browser.wait_until("document.querySelectorAll('.bar').length == 270")
    for _ in range(6):
        browser.key("Tab", "Tab", 9)
        if browser.evaluate("document.activeElement.classList.contains('bar')"):
            break
    focused = browser.evaluate(
        """(() => { const bar = document.activeElement;
            return {isBar: bar.classList.contains('bar'), label: bar.getAttribute('aria-label'),
                    tip: getComputedStyle(bar.querySelector('.tip')).display,
                    component: bar.closest('[data-component]').dataset.component}; })()"""
    )
    assert focused["isBar"], "Tab reaches the first day bar"
    assert focused["component"] == "api"
    assert focused["tip"] == "block", "the tooltip shows on focus"
    assert "no data" in focused["label"] or "uptime" in focused["label"]
    browser.key("Tab", "Tab", 9)
    assert browser.evaluate(
        "document.activeElement.previousElementSibling.classList.contains('bar')"
    )
    # The last bar is today, labelled with its date and what is known of it.
    today = browser.evaluate(
        "document.querySelector('[data-component=api] .bar:last-child').getAttribute('aria-label')"
    )
    assert today.startswith(time.strftime("%Y-%m-%d: ", time.gmtime()))


_CONTRAST = """(() => {
  const lum = c => {
    const [r, g, b] = c.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number).map(v => {
      v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const bg = el => {
    for (; el; el = el.parentElement) {
      const c = getComputedStyle(el).backgroundColor;
      if (c !== 'rgba(0, 0, 0, 0)' && c !== 'transparent') return c;
    }
    return 'rgb(255, 255, 255)'; };
  const ratio = el => { const a = lum(getComputedStyle(el).color), b = lum(bg(el));
      return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); };
  const worst = {};
  const texts = '#banner, .badge, .reason, .component-since, .muted, h1, h2, h3, '
    + '.uptime-summary, .incident-when';
  for (const el of document.querySelectorAll(texts)) {
    if (!el.textContent.trim() || el.hidden) continue;
    const key = el.id ? '#' + el.id : el.className;
    worst[key] = Math.min(worst[key] || 99, ratio(el));
  }
  return worst; })()"""


def test_text_contrast_meets_wcag_aa(browser: Browser, site: _Site) -> None:
    for banner in ("unhealthy", "degraded", "healthy"):
        browser.open(site.nginx.url("/status/"))
        browser.wait_until("document.body.dataset.refreshed >= 1")
        # Every banner colour, whatever the current verdict.
        browser.evaluate(f"document.getElementById('banner').className = 'banner banner-{banner}'")
        ratios = browser.evaluate(_CONTRAST)
        assert ratios, "found text to measure"
        low = {k: round(v, 2) for k, v in ratios.items() if v < 4.5}
        assert low == {}, f"below 4.5:1 with the {banner} banner"


def test_the_snippet_serves_only_the_page_and_its_documents(site: _Site) -> None:
    status, headers, body = site.nginx.get("/status/")
    assert status == 200
    assert b"<title>Service status</title>" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name, kind in (
        ("status.js", "text/javascript"),
        ("status.css", "text/css"),
        ("status.json", "application/json"),
        ("history.json", "application/json"),
    ):
        status, headers, _ = site.nginx.get(f"/status/{name}")
        assert (status, headers["Content-Type"]) == (200, kind), name
        assert headers["Cache-Control"] == "no-cache"
    assert site.nginx.get("/status/history.db")[0] == 404
    assert site.nginx.get("/status/healthd.toml")[0] == 404
    assert site.nginx.get("/status/status.json", method="POST")[0] == 403
    assert site.nginx.get("/status")[0] == 301  # fmt: skip


def test_summary_mode_without_history_shows_statuses_and_no_reasons(
    browser: Browser, tmp_path: Path, http_target: HttpTarget
) -> None:
    directory = tmp_path / "public"
    web.install(directory)
    # history_file under a regular file cannot be opened, so there is no history.json at all.
    (tmp_path / "not-a-directory").write_text("")
    config = write_config(
        tmp_path / "healthd.toml",
        _settings(directory, status_details="summary",
                  history_file=str(tmp_path / "not-a-directory" / "history.db")),
        {"api": {"kind": "http", "url": http_target.url("/")},
         "db": {"kind": "tcp", "address": f"127.0.0.1:{free_port()}"}},
    )  # fmt: skip
    with running_healthd(config, ready=True):
        nginx = Nginx(tmp_path / "nginx", directory)
        try:
            browser.open(nginx.url("/status/"))
            browser.wait_until("document.body.dataset.refreshed >= 1")
            state = _page_state(browser)
            _screenshot(browser, tmp_path, "status-summary")
        finally:
            nginx.close()
    assert not (directory / "history.json").exists()
    assert state["noHistory"] is True
    components = state["components"]
    assert isinstance(components, dict)
    assert components["api"]["status"] == "healthy", components
    assert components["db"]["status"] == "unhealthy"
    assert components["db"]["reason"] == "connection_refused", "the code, never the reason"
    assert components["db"]["bars"] == 0
    assert state["incidents"] == []
    assert browser.console_errors() == []
