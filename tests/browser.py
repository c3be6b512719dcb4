"""A real headless Chromium, driven over the Chrome DevTools protocol.

``--remote-debugging-pipe`` speaks CDP over file descriptors 3 (commands in) and 4 (replies
out), one JSON message per NUL-terminated frame: no websocket client is needed. One page
(target) per ``Browser``; ``evaluate`` runs JavaScript in it and returns the value.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Browser", "chromium_binary"]


def chromium_binary() -> str | None:
    """Debian's ``chromium`` (or a ``chromium-browser``/``google-chrome`` on the PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


class Browser:
    """Headless Chromium with one page. Use as a context manager."""

    def __init__(self, profile: Path, *, width: int = 1280, height: int = 900) -> None:
        binary = chromium_binary()
        assert binary is not None, "chromium is not installed"
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        self._log = (profile.parent / f"{profile.name}.log").open("wb")
        args = [
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # the tests may run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            f"--user-data-dir={profile}",
            "about:blank",
        ]

        def pipes_on_3_and_4() -> None:
            # Runs in the child before exec; dup2 leaves the copies inheritable.
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self.process = subprocess.Popen(
            [binary, *args],
            pass_fds=(3, 4),
            preexec_fn=pipes_on_3_and_4,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._opened_at = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.resize(width, height)

    # --- protocol -----------------------------------------------------------------------------

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            *frames, buffer = buffer.split(b"\0")
            with self._cond:
                for frame in frames:
                    message = json.loads(frame)
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cond.notify_all()

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its reply; raise on a protocol error."""
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        with self._cond:
            found = self._cond.wait_for(
                lambda: ident in self._replies or self.process.poll() is not None, 30
            )
            assert found, f"no reply to {method}"
            assert ident in self._replies, f"chromium exited during {method}"
            reply = self._replies.pop(ident)
        assert "error" not in reply, f"{method}: {reply['error']}"
        result: dict[str, Any] = reply.get("result", {})
        return result

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """A command for the page."""
        return self.send(method, self._session, **params)

    # --- what tests use -----------------------------------------------------------------------

    def resize(self, width: int, height: int, *, mobile: bool = False) -> None:
        """Emulate a viewport of this size (a phone with ``mobile=True``)."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )

    def open(self, url: str, timeout: float = 15) -> None:
        """Navigate and wait for the load event."""
        with self._cond:
            seen = self._opened_at = len(self.events)
        self.call("Page.navigate", url=url)
        with self._cond:
            loaded = self._cond.wait_for(
                lambda: any(e["method"] == "Page.loadEventFired" for e in self.events[seen:]),
                timeout,
            )
        assert loaded, f"{url} did not load"

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises are awaited)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 10) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.1)

    def key(self, key: str, code: str, key_code: int, *, shift: bool = False) -> None:
        """Press and release one key, as a keyboard would."""
        modifiers = 8 if shift else 0
        for kind in ("rawKeyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key=key,
                code=code,
                windowsVirtualKeyCode=key_code,
                modifiers=modifiers,
            )

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """Save a PNG of the page (the whole document by default)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def console_errors(self) -> list[str]:
        """Exceptions thrown and errors logged by the page since it was last opened."""
        found = []
        with self._cond:
            events = self.events[self._opened_at :]
        for event in events:
            if event["method"] == "Runtime.exceptionThrown":
                found.append(event["params"]["exceptionDetails"].get("text", "exception"))
            elif (
                event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error"
            ):
                found.append(str(event["params"]["args"]))
        return found

    def close(self) -> None:
        """End the browser."""
        try:
            self.send("Browser.close")
            self.process.wait(5)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
