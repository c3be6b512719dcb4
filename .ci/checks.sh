#!/usr/bin/env bash
# Deployment checks, run in CI and wrapped by tests/test_deploy_files.py: the systemd unit
# (verify, and security exposure below 2.0), the Prometheus rules (check and unit tests), the
# scrape snippet, the Dockerfile (hadolint), a live scrape of a real `healthd run`
# (promtool check metrics), and that every reference in the docs and the unit's Documentation=
# points at a file that exists. Needs systemd-analyze, promtool and the project venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-$PWD/.venv}"
tmp="$(mktemp -d)"
healthd_pid=""
cleanup() {
    # healthd writes a last status file on SIGTERM: wait for it before removing the directory.
    if [[ -n "$healthd_pid" ]]; then kill "$healthd_pid" 2>/dev/null && wait "$healthd_pid" || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "documentation: links, anchors and repository paths (tests/test_docs.py)"
"$venv/bin/python" tests/test_docs.py

step "systemd-analyze verify systemd/healthd.service"
# verify insists that ExecStart='s binary exists. The unit names the production path
# (/opt/healthd/venv/bin/healthd), so verify a copy that differs only in pointing ExecStart= at
# this checkout's venv.
sed "s#^ExecStart=/opt/healthd/venv/bin/healthd #ExecStart=$venv/bin/healthd #" \
    systemd/healthd.service >"$tmp/healthd.service"
if cmp -s systemd/healthd.service "$tmp/healthd.service"; then
    echo "ExecStart= no longer starts with /opt/healthd/venv/bin/healthd; update this script" >&2
    exit 1
fi
systemd-analyze verify "$tmp/healthd.service"

step "systemd-analyze security --offline=yes (exposure must be below 2.0)"
# --threshold is in tenths: 19 means "fail above 1.9".
systemd-analyze security --offline=yes --threshold=19 "$tmp/healthd.service" | tail -n 1

step "promtool check rules / test rules"
promtool check rules config/prometheus/healthd.rules.yml
(cd config/prometheus && promtool test rules healthd.rules.test.yml)
promtool check rules config/prometheus/healthd.slo.rules.yml
(cd config/prometheus && promtool test rules healthd.slo.rules.test.yml)
promtool check config --syntax-only config/prometheus/scrape.yml

step "hadolint Dockerfile"
"$venv/bin/hadolint" Dockerfile && echo "Dockerfile: OK"

step "promtool check metrics on a live scrape"
port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$tmp/healthd.toml" <<TOML
[daemon]
metrics_address = "127.0.0.1:$port"
status_file = "$tmp/status.json"
interval = "1s"
timeout = "500ms"
[components.refused]
kind = "tcp"
address = "127.0.0.1:1"
critical = true
TOML
"$venv/bin/python" -m healthd --config "$tmp/healthd.toml" --log-level warning run &
healthd_pid=$!
for _ in $(seq 100); do
    if "$venv/bin/python" - "$port" >"$tmp/metrics.txt" 2>/dev/null <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read()
sys.stdout.write(body.decode())
PY
    then break; fi
    sleep 0.1
done
grep -q '^healthd_component_up{component="refused",kind="tcp"} 0.0$' "$tmp/metrics.txt"
promtool check metrics <"$tmp/metrics.txt" && echo "metrics: OK"

printf '\nall deployment checks passed\n'
