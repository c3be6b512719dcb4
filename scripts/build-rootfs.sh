#!/usr/bin/env bash
# Build, once, the Debian bookworm root filesystem that tests/test_systemd_unit.py boots with
# systemd-nspawn, and print its path. The directory is named after a hash of the recipe below, so
# a changed recipe builds a new one and an unchanged one is reused. It is built in a temporary
# directory and renamed into place, so an interrupted build never leaves a half rootfs behind.
#
#   bash scripts/build-rootfs.sh            build when missing, print the path
#   bash scripts/build-rootfs.sh --path     print the path only
#
# HEALTHD_TEST_CACHE (default /var/cache/healthd-tests) is where it lives; HEALTHD_ROOTFS_MIRROR
# overrides the Debian mirror, which is otherwise the one apt already uses on this machine.
set -euo pipefail

suite=bookworm
variant=minbase
include=systemd,systemd-sysv,dbus,procps,python3,python3-venv
arch="$(dpkg --print-architecture)"
cache="${HEALTHD_TEST_CACHE:-/var/cache/healthd-tests}"
recipe_hash="$(printf '%s\n' "$suite" "$variant" "$include" "$arch" | sha256sum | cut -c1-12)"
rootfs="$cache/rootfs-$suite-$recipe_hash"

if [[ "${1:-}" == "--path" ]]; then
    echo "$rootfs"
    exit 0
fi
if [[ -x "$rootfs/lib/systemd/systemd" ]]; then
    echo "$rootfs"
    exit 0
fi

# The first Debian archive apt already fetches $suite from, from a deb822 .sources file or a
# one-line sources.list entry; the machine may reach nothing but its package mirror.
apt_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$file" ]] || continue
        awk -v suite="$suite" '
            /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END { if (uri != "" && ok) print uri }
        ' "$file" | head -n 1
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$file" ]] || continue
        awk -v suite="$suite" '$1 == "deb" {
            for (i = 2; i < NF; i++) if ($i !~ /^\[/ && $(i + 1) == suite) { print $i; exit }
        }' "$file"
    done
}
mirror="${HEALTHD_ROOTFS_MIRROR:-$(apt_mirror | head -n 1)}"
mirror="${mirror:-http://deb.debian.org/debian}"

mkdir -p "$cache"
exec 9>"$cache/.rootfs.lock"
flock 9
# Another run may have finished the build while this one waited for the lock.
if [[ -x "$rootfs/lib/systemd/systemd" ]]; then
    echo "$rootfs"
    exit 0
fi

tmp="$(mktemp -d "$cache/.rootfs-$suite-$recipe_hash.XXXXXX")"
trap 'rm -rf "$tmp" "$tmp.log"' EXIT
echo "building $rootfs from $mirror (about a minute)" >&2
debootstrap --variant="$variant" --include="$include" --arch="$arch" \
    "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
    tail -n 30 "$tmp.log" >&2
    exit 1
}
rm -f "$tmp.log"
# Each boot gets a fresh transient machine id; apt's downloaded packages are dead weight.
: >"$tmp/etc/machine-id"
rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*
# The mount point of the venv's overlay: nspawn would create it in this tree, not in the boot's.
mkdir -p "$tmp/opt/healthd/venv"
chmod 0755 "$tmp"
mv -T "$tmp" "$rootfs"
trap - EXIT
echo "$rootfs"
