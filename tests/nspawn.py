"""A real systemd 252 booted in a throwaway systemd-nspawn container, driven from the host.

The Debian bookworm root filesystem is built once by ``scripts/build-rootfs.sh`` and cached
outside the repository (``$HEALTHD_TEST_CACHE``, default ``/var/cache/healthd-tests``), next to
the two other slow things, each named after a hash of what it is built from:

- ``wheels-*``: healthd's dependencies as wheels, downloaded by the host's pip for the
  container's Python (Debian's 3.11), since the container cannot reach the package index;
- ``venv-*``: ``/opt/healthd/venv`` with those dependencies installed, built by the container's
  own python3.

A boot mounts the rootfs read-only under a tmpfs overlay (``--volatile=overlay``) and the venv
under another overlay, so nothing a test does reaches the cache; healthd itself is then
installed into the venv from this checkout. The container shares the host's network (no
``--private-network``), so it reaches servers the tests start on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

__all__ = ["Container", "NspawnUnavailable", "prepare"]

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("HEALTHD_TEST_CACHE", "/var/cache/healthd-tests"))
VENV = "/opt/healthd/venv"
_WHEELS = "/opt/healthd-wheels"
_SOURCE = "/opt/healthd-src"
_RUNNING = CACHE_DIR / "running"
# Debian's Python is 3.11.2, and pip evaluates markers with the host's full version (3.11.7
# here) even with --python-version: redis needs async-timeout below 3.11.3, so name it.
_CONTAINER_ONLY_REQUIREMENTS = ["async-timeout>=4.0.3"]
# healthd is installed without build isolation (no index in the container): its build backend.
_BUILD_REQUIREMENTS = ["setuptools>=68", "wheel"]
# nsenter passes the caller's environment on; the container's commands get a clean one.
_CONTAINER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class NspawnUnavailable(RuntimeError):
    """systemd-nspawn cannot boot a container here; the message names what failed."""


def _run(argv: list[str], timeout_seconds: float, what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_seconds)
    except FileNotFoundError as exc:
        raise NspawnUnavailable(f"{what}: {argv[0]} is not installed") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise NspawnUnavailable(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling of ``final`` and rename it into place."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not just another run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _rootfs() -> Path:
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            raise NspawnUnavailable(f"{tool} is not installed (scripts/test.sh installs it)")
    out = _run(["bash", str(REPO / "scripts/build-rootfs.sh")], 1800, "scripts/build-rootfs.sh")
    return Path(out.strip().splitlines()[-1])


def _container_python(rootfs: Path) -> str:
    """The container's Python version, read from its own interpreter."""
    code = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
    return _run(["chroot", str(rootfs), "python3", "-c", code], 60, "python3 in the rootfs").strip()


def _requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *_CONTAINER_ONLY_REQUIREMENTS, *_BUILD_REQUIREMENTS]


def _wheelhouse(python_version: str) -> Path:
    requirements = _requirements()
    key = hashlib.sha256(json.dumps([python_version, requirements]).encode()).hexdigest()[:12]

    def download(into: Path) -> None:
        (into / "requirements.txt").write_text("\n".join(requirements) + "\n")
        argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
        argv += ["--only-binary=:all:", f"--python-version={python_version}", "-d", str(into)]
        _run([*argv, "-r", str(into / "requirements.txt")], 900, "pip download (wheels)")

    return _build_atomically(CACHE_DIR / f"wheels-{key}", download)


def _venv(rootfs: Path, wheels: Path) -> Path:
    key = hashlib.sha256(f"{rootfs.name} {wheels.name}".encode()).hexdigest()[:12]

    def build(into: Path) -> None:
        script = (
            f"python3 -m venv {VENV} && {VENV}/bin/pip install -q --disable-pip-version-check"
            f" --no-index --find-links {_WHEELS} -r {_WHEELS}/requirements.txt"
        )
        argv = ["systemd-nspawn", "-D", str(rootfs), "--volatile=overlay", "--register=no"]
        argv += ["--keep-unit", "--quiet", "--pipe", f"--bind={into}:{VENV}"]
        argv += [f"--bind-ro={wheels}:{_WHEELS}", "--", "/bin/sh", "-c", script]
        _run(argv, 600, "building the venv in the container")

    return _build_atomically(CACHE_DIR / f"venv-{key}", build)


def prepare() -> tuple[Path, Path]:
    """The cached rootfs and venv, each built when missing: ``(rootfs, venv)``."""
    rootfs = _rootfs()
    return rootfs, _venv(rootfs, _wheelhouse(_container_python(rootfs)))


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _is_namespace_init(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the PID, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _reap_orphans() -> None:
    """Kill containers left by test runs that died without tearing down (SIGKILL, SIGTERM).

    Each boot records its own PIDs, and its test run's, with their start times; a record whose
    run is gone names processes only that run started, so killing them touches nothing else.
    """
    for record in _RUNNING.glob("*.json"):
        try:
            owner, *processes = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(owner[0]) == owner[1]:
            continue  # that run is still going
        for pid, started in processes:
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        record.unlink(missing_ok=True)


class Container:
    """One booted container; ``close()`` kills it (its PID 1 and the nspawn process group)."""

    def __init__(self, rootfs: Path, venv: Path, workdir: Path) -> None:
        _reap_orphans()
        self.machine = f"healthd-test-{os.getpid()}"
        self._record: Path | None = None
        self.boot_log = workdir / "boot.log"
        self.pid1 = 0
        # healthd is installed from a copy: setuptools writes its egg-info into the tree.
        source = workdir / "healthd-src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, source / name)
        shutil.copytree(REPO / "healthd", source / "healthd", ignore=_ignore_caches)
        argv = ["systemd-nspawn", "-D", str(rootfs), "-b", "--register=no", "--keep-unit"]
        argv += ["--quiet", f"--machine={self.machine}", "--volatile=overlay"]
        argv += ["--console=read-only", f"--overlay={venv}::{VENV}", f"--bind={source}:{_SOURCE}"]
        with self.boot_log.open("wb") as log:
            self._nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_for_boot()
            self._remember()
            self._install_healthd()
        except BaseException:
            self.close()
            raise

    def _wait_for_boot(self, timeout_seconds: float = 90) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not self.pid1:
            if self._nspawn.poll() is not None:
                raise NspawnUnavailable(
                    f"systemd-nspawn exited {self._nspawn.returncode}: {self._log()}"
                )
            self.pid1 = next(
                (child for child in _children(self._nspawn.pid) if _is_namespace_init(child)), 0
            )
            if time.monotonic() > deadline:
                raise NspawnUnavailable(
                    f"no container PID 1 after {timeout_seconds:.0f}s: {self._log()}"
                )
            time.sleep(0.05)
        # The bus answers once systemd has set up; --wait returns when start-up has finished.
        while True:
            remaining = deadline - time.monotonic()
            done = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=max(remaining, 1)
            )
            if done.stdout.strip() in ("running", "degraded"):
                return
            if remaining <= 0 or self._nspawn.poll() is not None:
                state = f"{done.stdout.strip()} {done.stderr.strip()}"
                raise NspawnUnavailable(f"systemd did not finish booting ({state}): {self._log()}")
            time.sleep(0.2)

    def _remember(self) -> None:
        me = os.getpid()
        processes = [(pid, _start_time(pid)) for pid in (me, self.pid1, self._nspawn.pid)]
        _RUNNING.mkdir(parents=True, exist_ok=True)
        self._record = _RUNNING / f"{self._nspawn.pid}.json"
        self._record.write_text(json.dumps(processes))

    def _install_healthd(self) -> None:
        self.run(
            f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index",
            "--no-deps", "--no-build-isolation", _SOURCE, timeout=180,
        )  # fmt: skip

    def _log(self) -> str:
        try:
            return self.boot_log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    # --- driving it ---------------------------------------------------------------------------

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container, in all of PID 1's namespaces."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
            input=input, capture_output=True, text=True, timeout=timeout, env=_CONTAINER_ENV,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start ``argv`` inside the container without waiting; output on ``stdout``."""
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_CONTAINER_ENV,
        )  # fmt: skip

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """``systemctl ARGS`` in the container; its standard output."""
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout).stdout

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """Unit properties, as ``systemctl show`` prints them."""
        out = self.systemctl("show", unit, "--property=" + ",".join(properties))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def path(self, path: str) -> Path:
        """The host's view of ``path`` inside the container (through PID 1's root)."""
        return Path(f"/proc/{self.pid1}/root") / path.lstrip("/")

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a root-owned file inside the container, creating its directory."""
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def journal_cursor(self) -> str:
        """A journal position to read from later with ``journal(after=...)``."""
        self.run("journalctl", "--sync", check=False)
        out = self.run("journalctl", "-n", "0", "--show-cursor", "--quiet").stdout
        return out.strip().removeprefix("-- cursor: ")

    def journal(self, unit: str, after: str) -> str:
        """The unit's journal since ``after``, message text only."""
        self.run("journalctl", "--sync", check=False)
        args = ["journalctl", "--no-pager", "-o", "cat", "-u", unit, f"--after-cursor={after}"]
        return self.run(*args).stdout

    def close(self) -> None:
        """Kill the container: PID 1 (which takes its namespace with it), then nspawn."""
        if self.pid1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._nspawn.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._nspawn.pid, signal.SIGKILL)
        self._nspawn.wait(10)
        if self._record is not None:
            self._record.unlink(missing_ok=True)


def _ignore_caches(_directory: str, names: list[str]) -> list[str]:
    return [name for name in names if name == "__pycache__"]
