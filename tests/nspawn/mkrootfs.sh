#!/usr/bin/env bash
# Build (or reuse) the Debian bookworm root filesystem that tests/test_systemd.py boots with
# systemd-nspawn, with the appliance's dependencies installed in /opt/appliance/venv (the
# path the flashable images use), and build this checkout's appliance wheel.
#
#   tests/nspawn/mkrootfs.sh OUT_DIR      prints the rootfs path; writes OUT_DIR/appliance-*.whl
#
# Two cached layers under $APPLIANCE_CI_CACHE (default /var/cache/appliance-ci), each built in a
# temporary directory and renamed into place only when complete (a killed build leaves nothing
# half-made behind), and pruned after two days without use:
#   base-<key>   mmdebstrap minbase + systemd, python3 ...   key: this script's sha256
#   venv-<key>   base + /opt/appliance/venv with the dependencies (not the appliance itself)
#                key: base key + pyproject.toml + the versions pinned from the test venv
# The appliance wheel is rebuilt on every run; the test installs it into the booted container.
#
# Needs root, mmdebstrap, systemd-nspawn (systemd-container) and the network (Debian mirror,
# PyPI). Run it in the host's network namespace: the test suite runs in a private one.
set -euo pipefail

out=${1:?usage: mkrootfs.sh OUT_DIR}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${APPLIANCE_CI_CACHE:-/var/cache/appliance-ci}
suite=bookworm
mirror=${APPLIANCE_CI_MIRROR:-http://deb.debian.org/debian}
python=${APPLIANCE_CI_PYTHON:-$repo/.venv/bin/python}   # Python 3.11, like bookworm's

# What the appliance needs at run time on a device, and no more (no procps: the images have
# none either, so a unit that needs /bin/kill fails here as it would there): systemd + dbus to
# boot, Python 3.11 + venv, PortAudio (pyaudio), libsystemd (systemd-python).
packages=(
    systemd systemd-sysv dbus
    python3 python3-venv
    libportaudio2 libasound2 libsystemd0
    ca-certificates
)

log() { printf 'mkrootfs: %s\n' "$*" >&2; }
# need_network STEP WHAT URL...: one line and exit 1 when a cold layer cannot fetch
need_network() { "$repo/image-build/need-network" "$@" || exit 1; }

[ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }
mkdir -p "$cache" "$out"
exec 9>"$cache/.lock"
flock 9   # one builder at a time on this machine
rm -rf "$cache"/.base-* "$cache"/.venv-*   # left by a build that was killed

sha() { sha256sum | cut -c1-16; }
base_key=$(sha < "$0")
base=$cache/base-$base_key

# ---------------------------------------------------------------- layer 1: the Debian system
if [ ! -d "$base" ]; then
    log "building $base (mmdebstrap $suite, minbase + ${#packages[@]} packages)"
    need_network "mkrootfs base" "the Debian mirror" "$mirror"
    started=$(date +%s)
    tmp=$(mktemp -d "$cache/.base-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    rmdir "$tmp"
    # shellcheck disable=SC2016  # the hooks' "$1" is mmdebstrap's, not ours
    mmdebstrap --quiet --variant=minbase --mode=root --format=directory \
        --include="$(IFS=,; echo "${packages[*]}")" \
        --customize-hook='chroot "$1" systemctl mask getty@tty1.service console-getty.service systemd-networkd-wait-online.service' \
        --customize-hook='echo appliance-ci > "$1/etc/hostname"' \
        --customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"' \
        "$suite" "$tmp" "$mirror" >&2
    mv "$tmp" "$base"
    trap - EXIT
    log "base built in $(( $(date +%s) - started )) s"
fi

# ---------------------------------------------------------------- layer 2: the venv's dependencies
constraints=$out/constraints.txt
"$python" -m pip freeze --exclude-editable --all | grep -v -i '^appliance[= ]' > "$constraints"
venv_key=$base_key-$(cat "$repo/pyproject.toml" "$constraints" | sha)
layer=$cache/venv-$venv_key

log "building the appliance wheel"
# from a clean copy of what the package is made of: setuptools' build/ in the checkout could
# carry modules that no longer exist, and other people's builds may be running there
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -a "$repo/pyproject.toml" "$repo/README.md" "$repo/appliance" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$out"/appliance-*.whl
"$python" -m pip wheel -qq --no-deps --wheel-dir "$out" "$src" >&2
rm -rf "$src"
trap - EXIT
wheel=$(ls "$out"/appliance-*.whl)

if [ ! -d "$layer" ]; then
    log "building $layer (dependency wheels + /opt/appliance/venv)"
    need_network "mkrootfs venv" "PyPI (dependency wheels)" "${PIP_INDEX_URL:-https://pypi.org/simple}"
    started=$(date +%s)
    wheels=$cache/wheels
    mkdir -p "$wheels"
    # the same versions the test venv runs with; sdists (pyaudio, systemd-python) are built here,
    # against the build machine's Debian 12 (the rootfs has the matching run-time libraries)
    # pip also saves the appliance wheel there: a stale one would be taken for this one (same
    # version, older dependencies) next time, so none is kept
    rm -f "$wheels"/appliance-*.whl
    "$python" -m pip wheel -qq --wheel-dir "$wheels" --constraint "$constraints" "$wheel" >&2
    rm -f "$wheels"/appliance-*.whl
    tmp=$(mktemp -d "$cache/.venv-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    cp -a --reflink=auto "$base/." "$tmp/"
    systemd-nspawn --quiet --register=no --keep-unit --private-network --pipe \
        --directory="$tmp" --bind-ro="$wheels:/mnt/wheels" --bind-ro="$out:/mnt/out" \
        /bin/sh -euc '
            python3 -m venv /opt/appliance/venv
            /opt/appliance/venv/bin/pip install -qq --no-index --find-links /mnt/wheels \
                --constraint /mnt/out/constraints.txt /mnt/out/'"$(basename "$wheel")"'
            /opt/appliance/venv/bin/pip uninstall -qq --yes appliance
        ' >&2
    mv "$tmp" "$layer"
    trap - EXIT
    log "venv layer built in $(( $(date +%s) - started )) s"
fi

# Layers are pruned once unused for two days, not as soon as a key changes: another test run
# on this machine may be booting an older layer right now (it is its overlay's lower layer).
touch "$base" "$layer"
find "$cache" -mindepth 1 -maxdepth 1 -type d \( -name 'base-*' -o -name 'venv-*' \) -mtime +2 \
    -exec rm -rf {} + 2>/dev/null || true

echo "$layer"
