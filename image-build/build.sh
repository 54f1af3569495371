#!/bin/bash
# Build a flashable kiosk image from this repository.
#
#   image-build/build.sh --arch amd64                 # x86_64 UEFI (GPT, systemd-boot on the ESP)
#   image-build/build.sh --arch arm64 --board virt    # generic arm64 UEFI (qemu -M virt, mini PCs)
#   image-build/build.sh --arch arm64 --board rpi4    # Raspberry Pi 4/400/CM4 (MBR, raspi-firmware)
#
# Layers, each cached under $IMAGE_CACHE (/var/cache/appliance-image) by a hash of its inputs:
#   wheels   the Python dependency wheels for the target arch (key: pyproject.toml)
#   rootfs   Debian bookworm from mmdebstrap + the venv with those wheels (key: package lists,
#            hooks, mirror, wheels key) — a tarball
#   image    always rebuilt: the rootfs + this checkout's appliance wheel, units, config,
#            overlay, boot partition; genimage; compression; SHA256; Raspberry Pi Imager JSON
# Run as root (mmdebstrap --mode=root, chroot). No Docker, no loop devices, no mounts.
# Options: --out DIR (default image-build/out), --fresh (ignore the caches),
#          --no-compress (stop at the raw image in the work directory: for boot tests).
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${IMAGE_CACHE:-/var/cache/appliance-image}"
SUITE=bookworm
ARCH=amd64
BOARD=""
OUT="$HERE/out"
FRESH=0
COMPRESS=1
KEEP_ROOTFS=3 # cached rootfs tarballs kept per arch/board

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH="$2"; shift 2 ;;
        --board) BOARD="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --fresh) FRESH=1; shift ;;
        --no-compress) COMPRESS=0; shift ;;
        -h|--help) usage ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage ;;
    esac
done
case "$ARCH/${BOARD:=$([ "$ARCH" = amd64 ] && echo pc || echo virt)}" in
    amd64/pc|arm64/virt|arm64/rpi4) ;;
    *) echo "build.sh: unsupported --arch $ARCH --board $BOARD (amd64/pc, arm64/virt, arm64/rpi4)" >&2; exit 2 ;;
esac

NAME="kiosk-$SUITE-$ARCH-$BOARD"
WORK="$CACHE/work/$ARCH-$BOARD"
LOGS="$WORK/logs"
ROOT="$WORK/root"

# ---------------------------------------------------------------------------------------------
# Steps: each one is named, timed and logged to $LOGS/<step>.log; a failure names the step,
# the command and shows the end of its log.

STEP="" STEP_LOG="" BUILD_T0=$SECONDS
declare -a TIMINGS=()

# fd 3: the terminal, also from inside a step whose output goes to its log
exec 3>&2
log() { printf '[image %s/%s] %s\n' "$ARCH" "$BOARD" "$*" >&3; }

on_error() {
    local rc=$? cmd=$BASH_COMMAND
    trap - ERR
    {
        echo
        echo "image build FAILED in step '${STEP:-setup}' (exit $rc)"
        echo "  command: $cmd"
        if [ -n "$STEP_LOG" ] && [ -s "$STEP_LOG" ]; then
            echo "  last lines of $STEP_LOG:"
            tail -n 25 "$STEP_LOG" | sed 's/^/    | /'
        fi
    } >&3
    exit "$rc"
}
trap on_error ERR

# step NAME FUNCTION: run FUNCTION with its output in $LOGS/NAME.log
step() {
    STEP="$1"; STEP_LOG="$LOGS/$1.log"
    local t0=$SECONDS
    log "▶ $1"
    : > "$STEP_LOG"
    "$2" >>"$STEP_LOG" 2>&1
    TIMINGS+=("$(printf '%-10s %4d s  %s' "$1" $((SECONDS - t0)) "${STEP_NOTE:-}")")
    log "✓ $1 ($((SECONDS - t0)) s) ${STEP_NOTE:-}"
    STEP_NOTE=""
}

die() { echo "$*" >&2; return 1; }

# Commands inside the image tree (through qemu-user for arm64), without the host's
# PIP_*/PYTHON* environment.
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

hash_of() { sha256sum | cut -c1-16; }

# need_network WHAT URL...: a step about to fetch fails in one line if the network is not there
PYPI_URL="${PIP_INDEX_URL:-https://pypi.org/simple}"
need_network() { "$HERE/need-network" "$STEP" "$@" || return 1; }

# ---------------------------------------------------------------------------------------------

preflight() {
    [ "$(id -u)" = 0 ] || die "run as root (mmdebstrap --mode=root and chroot need it)"
    local missing=() t
    for t in mmdebstrap genimage mcopy mkfs.vfat mke2fs zstd xz python3 sha256sum; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    [ ${#missing[@]} = 0 ] || die "missing tools: ${missing[*]} — apt-get install mmdebstrap genimage mtools dosfstools e2fsprogs zstd xz-utils python3-venv"
    if [ "$ARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then
        command -v qemu-aarch64-static >/dev/null || die "arm64 on $(uname -m) needs qemu-user-static"
        # binfmt_misc is not mounted in containers/CI runners: mount it and register qemu-aarch64
        # (with the F flag, so the interpreter works inside the chroot).
        mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
            local conf=/usr/lib/binfmt.d/qemu-aarch64.conf
            [ -r "$conf" ] || die "no $conf (qemu-user-static)"
            # the file holds the register line; the interpreter path must be the static one
            sed 's|:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:|:/usr/bin/qemu-aarch64-static:|' "$conf" \
                > /proc/sys/fs/binfmt_misc/register
        fi
        echo "binfmt: $(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64) $(grep interpreter /proc/sys/fs/binfmt_misc/qemu-aarch64)"
    fi
    # The Debian mirror the host's apt uses (deb822 or one-line sources), so the build goes
    # wherever this machine is allowed to go.
    MIRROR="${IMAGE_MIRROR:-$(apt_mirror 'debian$' http://deb.debian.org/debian)}"
    SECURITY_MIRROR="${IMAGE_SECURITY_MIRROR:-$(apt_mirror 'debian-security$' http://deb.debian.org/debian-security)}"
    echo "mirror: $MIRROR  security: $SECURITY_MIRROR"
    mkdir -p "$CACHE/wheels" "$CACHE/rootfs" "$OUT"
}

# apt_mirror REGEX DEFAULT: the first URI in the host's apt sources that matches REGEX
apt_mirror() {
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\([^[:space:]]*\).*/\2/p' \
        | tr ' ' '\n' | sed 's|/*$||' | grep -E "$1" | head -n1 || true)
    echo "${uri:-$2}"
}

# ---------------------------------------------------------------------------------------------
# The appliance wheel of this checkout.

app_wheel() {
    tools_venv
    rm -rf "$WORK/app" && mkdir -p "$WORK/app"
    # no build isolation: setuptools comes from the tools venv, so a warm build needs no network
    PIP_CONFIG_FILE=/dev/null "$CACHE/tools/bin/pip" wheel --no-deps --no-build-isolation --quiet \
        -w "$WORK/app" "$REPO"
    APP_WHEEL=$(ls "$WORK/app"/appliance-*.whl)
    STEP_NOTE="$(basename "$APP_WHEEL")"
}

# A small venv on the host with a current pip: wheel building and cross-arch downloads.
tools_venv() {
    if [ ! -x "$CACHE/tools/bin/pip" ] || ! "$CACHE/tools/bin/python" -c 'import setuptools, wheel' 2>/dev/null; then
        need_network "PyPI (pip, setuptools and wheel for the build tools)" "$PYPI_URL"
        python3 -m venv "$CACHE/tools"
        PIP_CONFIG_FILE=/dev/null "$CACHE/tools/bin/pip" install --quiet --upgrade pip 'setuptools>=68' wheel
    fi
}

# ---------------------------------------------------------------------------------------------
# The dependency layer: wheels for the target, from PyPI, keyed by pyproject.toml.
# pyaudio and systemd-python are left out: Debian's python3-pyaudio and python3-systemd
# provide them (the venv sees system site-packages), so nothing is compiled for the target.

WHEEL_PLATFORMS() {
    local m v
    m=$([ "$ARCH" = amd64 ] && echo x86_64 || echo aarch64)
    # bookworm has glibc 2.36: every manylinux tag up to 2_36
    for v in 36 35 34 33 32 31 30 29 28 27 26 25 24 17; do echo "--platform manylinux_2_${v}_$m"; done
    echo "--platform manylinux2014_$m --platform linux_$m"
}

wheels() {
    tools_venv
    local key
    # keyed by the dependency list only (not the version or the tool settings in pyproject.toml)
    key=$( { python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(p.get("requires-python"), sorted(p["dependencies"]))' "$REPO/pyproject.toml"; echo "$ARCH"; WHEEL_PLATFORMS; } | hash_of)
    WHEELHOUSE="$CACHE/wheels/$ARCH-$key"
    if [ "$FRESH" = 0 ] && [ -e "$WHEELHOUSE/requirements.txt" ]; then
        STEP_NOTE="cached ($WHEELHOUSE)"
        return
    fi
    need_network "PyPI (the dependency wheels for $ARCH; the wheel cache is cold)" "$PYPI_URL"
    local tmp="$WHEELHOUSE.tmp"
    rm -rf "$tmp" && mkdir -p "$tmp"
    python3 - "$REPO/pyproject.toml" > "$tmp/requirements.in" <<'EOF'
import re, sys, tomllib
FROM_DEBIAN = {"pyaudio", "systemd-python"}  # python3-pyaudio, python3-systemd
for req in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")
    if name not in FROM_DEBIAN:
        print(req)
EOF
    # shellcheck disable=SC2046
    PIP_CONFIG_FILE=/dev/null "$CACHE/tools/bin/pip" download --quiet --dest "$tmp" \
        --only-binary=:all: $(WHEEL_PLATFORMS) --python-version 3.11 --implementation cp --abi cp311 \
        -r "$tmp/requirements.in"
    # pin exactly what was downloaded, so the image installs this set and nothing else
    (cd "$tmp" && ls ./*.whl | sed -E 's|^\./([^-]+)-([^-]+)-.*|\1==\2|' | sort -u > requirements.txt)
    rm -rf "$WHEELHOUSE" && mv "$tmp" "$WHEELHOUSE"
    ls -dt "$CACHE/wheels/$ARCH-"*[0-9a-f] | tail -n +$((KEEP_ROOTFS + 1)) | xargs -r rm -rf
    STEP_NOTE="$(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
}

# ---------------------------------------------------------------------------------------------
# The Debian layer: mmdebstrap with hooks, as a tarball keyed by everything that shapes it.

package_list() {
    grep -hv '^[[:space:]]*#' "$HERE/packages/common.txt" "$HERE/packages/$ARCH-$BOARD.txt" \
        | awk 'NF' | paste -sd, -
}

rootfs() {
    local components=main key
    [ "$BOARD" = rpi4 ] && components="main non-free-firmware"
    key=$( { echo "$SUITE $ARCH $BOARD $MIRROR $SECURITY_MIRROR $components"; package_list
             cat "$HERE"/hooks/*; basename "$WHEELHOUSE"; } | hash_of)
    ROOTFS_TAR="$CACHE/rootfs/$ARCH-$BOARD-$key.tar"
    if [ "$FRESH" = 0 ] && [ -s "$ROOTFS_TAR" ]; then
        STEP_NOTE="cached ($ROOTFS_TAR)"
        return
    fi
    need_network "the Debian mirrors (the rootfs cache is cold)" "$MIRROR" "$SECURITY_MIRROR"
    export IMG_ARCH="$ARCH" IMG_BOARD="$BOARD" IMG_WHEELHOUSE="$WHEELHOUSE"
    # the host's pip settings must not leak into the chroot's pip
    unset PIP_FIND_LINKS PIP_CONFIG_FILE PIP_INDEX_URL PIP_EXTRA_INDEX_URL
    TMPDIR="$CACHE" mmdebstrap --mode=root --variant=apt --arch="$ARCH" \
        --include="$(package_list)" \
        --components="$components" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --setup-hook="\"$HERE/hooks/setup.sh\" \"\$1\"" \
        --customize-hook="\"$HERE/hooks/customize.sh\" \"\$1\"" \
        "$SUITE" "${ROOTFS_TAR%.tar}.tmp.tar" \
        "deb $MIRROR $SUITE $components" \
        "deb $MIRROR $SUITE-updates $components" \
        "deb $SECURITY_MIRROR $SUITE-security $components"
    mv "${ROOTFS_TAR%.tar}.tmp.tar" "$ROOTFS_TAR"
    # keep the newest few per arch/board
    ls -t "$CACHE/rootfs/$ARCH-$BOARD-"*[0-9a-f].tar | tail -n +$((KEEP_ROOTFS + 1)) | xargs -r rm -f
    STEP_NOTE="$(du -h "$ROOTFS_TAR" | cut -f1)"
}

# ---------------------------------------------------------------------------------------------
# The image tree: rootfs + this checkout.

tree() {
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    tar -C "$ROOT" --numeric-owner --xattrs --xattrs-include='*' -xpf "$ROOTFS_TAR"
}

# copy_confs SRC_DIR DEST_DIR GLOB: install matching files, if any
copy_confs() {
    local f
    [ -d "$1" ] || return 0
    for f in "$1"/$3; do [ -e "$f" ] && install -Dm 0644 "$f" "$2/$(basename "$f")"; done
    return 0
}


install_app() {
    local whl units f enable=()
    whl=$(basename "$APP_WHEEL")
    cp "$APP_WHEEL" "$ROOT/tmp/$whl"
    in_root /opt/appliance/venv/bin/pip install --no-index --no-deps --no-cache-dir --quiet "/tmp/$whl"
    rm -f "$ROOT/tmp/$whl"
    in_root /opt/appliance/venv/bin/pip check
    in_root /opt/appliance/venv/bin/appliance --version
    # `appliance status`, `sudo appliance say ...` for an operator at the console or over SSH
    ln -sf /opt/appliance/venv/bin/appliance "$ROOT/usr/local/bin/appliance"

    # units: the repository's systemd/
    units="$REPO/systemd"
    [ -e "$units/appliance.service" ] || die "no $units/appliance.service"
    for f in "$units"/*; do
        case "$f" in
            *.service|*.socket|*.timer|*.path|*.target)
                install -m 0644 "$f" "$ROOT/usr/lib/systemd/system/"
                # enable what has an [Install] section (templates are enabled by their users)
                if grep -q '^\[Install\]' "$f" && [[ "$f" != *@.* ]]; then enable+=("$(basename "$f")"); fi ;;
        esac
    done
    copy_confs "$units/sysusers.d" "$ROOT/usr/lib/sysusers.d" '*.conf'
    copy_confs "$units/tmpfiles.d" "$ROOT/usr/lib/tmpfiles.d" '*.conf'
    copy_confs "$units/udev" "$ROOT/usr/lib/udev/rules.d" '*.rules'
    systemd-sysusers --root="$ROOT"
    in_root id appliance || die "$units/sysusers.d creates no 'appliance' user"
    cp -a "$HERE/overlay/." "$ROOT/"
    if [ "$BOARD" != rpi4 ]; then cp -a "$HERE/overlay-uefi/." "$ROOT/"; fi
    for f in "$HERE"/overlay/usr/lib/systemd/system/*.service; do enable+=("$(basename "$f")"); done
    systemctl --root="$ROOT" enable "${enable[@]}"
    echo "enabled: ${enable[*]}"

    # config: the documented defaults; drop-ins (the machine identity) come at first boot
    install -d -m 0755 "$ROOT/etc/appliance" "$ROOT/etc/appliance/appliance.d"
    install -m 0644 "$REPO/config/appliance.toml" "$ROOT/etc/appliance/appliance.toml"
    in_root /opt/appliance/venv/bin/appliance check

    # what is this image
    cat > "$ROOT/etc/appliance-image" <<EOF
IMAGE_NAME=$NAME
IMAGE_VERSION=$VERSION
IMAGE_BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
IMAGE_GIT_COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo -dirty)
IMAGE_ARCH=$ARCH
IMAGE_BOARD=$BOARD
APPLIANCE_WHEEL=$whl
EOF
    in_root /opt/appliance/venv/bin/pip freeze --local > "$ROOT/opt/appliance/requirements.lock"
}

system_config() {
    # per-machine state is created on the device at first boot, never shipped
    echo uninitialized > "$ROOT/etc/machine-id"
    # systemd-firstboot would prompt for locale, timezone and a root password on the screen at
    # first boot and wait forever: a kiosk has nobody to answer (appliance-firstboot instead)
    ln -sf /dev/null "$ROOT/etc/systemd/system/systemd-firstboot.service"
    ln -sf /etc/machine-id "$ROOT/var/lib/dbus/machine-id"
    rm -f "$ROOT"/etc/ssh/ssh_host_*
    echo kiosk > "$ROOT/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tkiosk\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
    ln -sf /run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
    cat > "$ROOT/etc/fstab" <<'EOF'
# <file system>   <mount point>   <type>  <options>                                            <dump> <pass>
LABEL=kiosk-root  /               ext4    defaults,noatime,commit=60,errors=remount-ro         0      1
# the boot partition (FAT): firmware, kernel, and the operator's appliance.toml / authorized_keys;
# world-readable: nothing secret belongs there (secrets go to /etc/credstore)
# nofail: a damaged boot partition must not stop the kiosk after the kernel has loaded.
LABEL=KIOSKBOOT   /boot/firmware  vfat    defaults,noatime,fmask=0133,dmask=0022,nofail 0 2
EOF
    # no password anywhere: check it rather than trust it
    if awk -F: '$2 !~ /^[!*]/ && $2 != "" {print $1}' "$ROOT/etc/shadow" | grep .; then
        die "accounts with a usable password in /etc/shadow (above)"
    fi
    if awk -F: '$2 == "" {print $1}' "$ROOT/etc/shadow" | grep .; then
        die "accounts with an empty password in /etc/shadow (above)"
    fi
    rm -rf "$ROOT"/var/log/journal/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/tmp/* "$ROOT"/var/tmp/*
    find "$ROOT/var/log" -type f -exec truncate -s0 {} +
}

# The screen shows the avatar and nothing else: no blinking console cursor block over it (it
# showed in QEMU screendumps), no console blanking after 10 minutes.
SCREEN_CMDLINE="vt.global_cursor_default=0 consoleblank=0"

# The boot partition's content, in $ROOT/boot/firmware (genimage takes it from there).
bootfs() {
    local fw="$ROOT/boot/firmware" kver efiarch console
    kver=$(ls "$ROOT/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -n1)
    [ -n "$kver" ] || die "no kernel in $ROOT/boot"
    if [ "$BOARD" = rpi4 ]; then
        # raspi-firmware put the firmware, kernel, initrd, DTBs, config.txt and cmdline.txt here
        [ -e "$fw/start4.elf" ] && [ -e "$fw/cmdline.txt" ] || die "raspi-firmware did not populate /boot/firmware"
        # In the chroot raspi-firmware cannot see it is a Pi 4 and adds cma=64M, which its own
        # documentation says may leave a Pi 4 unbootable: no CMA setting, now and on upgrades.
        sed -i 's|^#\{0,1\}CMA=.*|CMA=0|' "$ROOT/etc/default/raspi-firmware"
        sed -i 's| cma=[^ ]*||' "$fw/cmdline.txt"
        grep -q 'root=LABEL=kiosk-root' "$fw/cmdline.txt" || die "cmdline.txt: $(cat "$fw/cmdline.txt")"
        # kernel upgrades rewrite cmdline.txt from raspi-extra-cmdline: keep the screen's options there
        echo "quiet $SCREEN_CMDLINE" > "$ROOT/etc/default/raspi-extra-cmdline"
        grep -q 'vt.global_cursor_default=0' "$fw/cmdline.txt" || sed -i "1s|\$| $SCREEN_CMDLINE|" "$fw/cmdline.txt"
    else
        efiarch=$([ "$ARCH" = amd64 ] && echo x64 || echo aa64)
        console=$([ "$ARCH" = amd64 ] && echo ttyS0,115200 || echo ttyAMA0,115200)
        install -Dm 0644 "$ROOT/usr/lib/systemd/boot/efi/systemd-boot$efiarch.efi" "$fw/EFI/BOOT/BOOT${efiarch^^}.EFI"
        install -Dm 0644 "$ROOT/usr/lib/systemd/boot/efi/systemd-boot$efiarch.efi" "$fw/EFI/systemd/systemd-boot$efiarch.efi"
        install -Dm 0644 /dev/stdin "$fw/loader/loader.conf" <<EOF
default appliance.conf
timeout 0
# no editing the kernel command line at the boot menu (init=/bin/sh) on a public kiosk
editor no
EOF
        # the serial console first, the screen last: /dev/console (systemd's messages, the
        # emergency shell) is the screen; appliance messages go to every console
        install -Dm 0644 /dev/stdin "$fw/loader/entries/appliance.conf" <<EOF
title   Avatar kiosk ($NAME $VERSION)
linux   /vmlinuz
initrd  /initrd.img
options root=LABEL=kiosk-root rw rootwait console=$console console=tty0 quiet $SCREEN_CMDLINE
EOF
        # kernel updates copy themselves here (overlay-uefi: /etc/kernel/postinst.d/zz-appliance-esp)
        cp "$ROOT/boot/vmlinuz-$kver" "$fw/vmlinuz"
        cp "$ROOT/boot/initrd.img-$kver" "$fw/initrd.img"
    fi
    cp "$HERE/bootfs/README.txt" "$fw/README.txt"
    cp "$REPO/config/appliance.toml" "$fw/appliance.toml.example"
    STEP_NOTE="kernel $kver, $(du -sh "$fw" | cut -f1)"
}

# ---------------------------------------------------------------------------------------------

genimage_step() {
    local root_mb boot_mb=256 cfg tmp="$WORK/genimage-tmp"
    # the root filesystem: what is there + 25% + 256 MiB, in 64 MiB steps; it grows to fill the
    # card at first boot
    root_mb=$(du -sm --exclude=./boot/firmware "$ROOT" | cut -f1)
    root_mb=$(( ( (root_mb * 125 / 100 + 256) + 63) / 64 * 64 ))
    cfg="$WORK/genimage.cfg"
    sed -e "s|@NAME@|$NAME|g" -e "s|@ROOT_SIZE@|${root_mb}M|g" -e "s|@BOOT_SIZE@|${boot_mb}M|g" \
        -e "s|@ROOT_TYPE@|$([ "$ARCH" = amd64 ] && echo 4f68bce3-e8cd-4db1-96e7-fbcaf984b709 || echo b921b045-1df0-41c3-af44-4c6f280d3fae)|g" \
        "$HERE/genimage/$([ "$BOARD" = rpi4 ] && echo mbr || echo gpt).cfg" > "$cfg"
    rm -rf "$tmp" "$WORK/images" && mkdir -p "$WORK/images" "$WORK/genimage-input"
    genimage --config "$cfg" --rootpath "$ROOT" --tmppath "$tmp" \
        --inputpath "$WORK/genimage-input" --outputpath "$WORK/images"
    rm -rf "$tmp"
    IMG="$WORK/images/$NAME.img"
    STEP_NOTE="$(( $(stat -c %s "$IMG") / 1048576 )) MiB (root ${root_mb} MiB, boot ${boot_mb} MiB)"
}

publish() {
    local base="$NAME-$VERSION" ext
    rm -f "$OUT/$NAME"-*.img* "$OUT/$NAME"-*.json "$OUT/$NAME"-*.sha256
    if [ "$COMPRESS" = 1 ]; then
        # xz for the Raspberry Pi (what Imager and every flasher read), zstd elsewhere (fast)
        if [ "$BOARD" = rpi4 ]; then
            ext=img.xz; xz -T0 -6 -c "$IMG" > "$OUT/$base.$ext"
        else
            ext=img.zst; zstd -T0 -10 -q -c "$IMG" > "$OUT/$base.$ext"
        fi
    else
        ext=img; cp --sparse=always "$IMG" "$OUT/$base.$ext"
    fi
    (cd "$OUT" && sha256sum "$base.$ext" > "$base.$ext.sha256")
    local extract_sha
    extract_sha=$(sha256sum "$IMG" | cut -d' ' -f1)
    python3 - "$OUT/$base.$ext" "$IMG" "$extract_sha" "$BOARD" "$ARCH" "$VERSION" > "$OUT/$base.json" <<'EOF'
import datetime, hashlib, json, os, sys
download, raw, extract_sha, board, arch, version = sys.argv[1:]
entry = {
    "name": f"Avatar kiosk {version} ({'Raspberry Pi 4/400/CM4' if board == 'rpi4' else arch + ' UEFI'})",
    "description": "Debian 12 kiosk that keeps a talking avatar live in a LiveKit room. "
                   "Put appliance.toml (and optionally authorized_keys) on the boot partition.",
    "icon": "",  # set with url when publishing (a 40x40 PNG)
    "url": os.path.basename(download),  # relative: replace with the published URL
    "extract_size": os.path.getsize(raw),
    "extract_sha256": extract_sha,
    "image_download_size": os.path.getsize(download),
    "image_download_sha256": hashlib.sha256(open(download, "rb").read()).hexdigest(),
    "release_date": datetime.date.today().isoformat(),
}
if board == "rpi4":
    entry["devices"] = ["pi4-64bit"]
print(json.dumps({"os_list": [entry]}, indent=2))
EOF
    DOWNLOAD="$OUT/$base.$ext"
    STEP_NOTE="$(basename "$DOWNLOAD") $(( $(stat -c %s "$DOWNLOAD") / 1048576 )) MiB"
}

# ---------------------------------------------------------------------------------------------

main() {
    VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/pyproject.toml")"
    mkdir -p "$LOGS"
    log "building $NAME $VERSION (logs in $LOGS)"
    step preflight preflight
    step app-wheel app_wheel
    step wheels wheels
    step rootfs rootfs
    step tree tree
    step app install_app
    step system system_config
    step bootfs bootfs
    step genimage genimage_step
    DOWNLOAD=""
    if [ "$COMPRESS" = 1 ]; then step publish publish; fi

    {
        echo
        echo "image $NAME $VERSION built in $((SECONDS - BUILD_T0)) s"
        printf '  %s\n' "${TIMINGS[@]}"
        echo "  raw image:  $IMG ($(( $(stat -c %s "$IMG") / 1048576 )) MiB, $(( $(du -k "$IMG" | cut -f1) / 1024 )) MiB allocated)"
        if [ -n "$DOWNLOAD" ]; then
            echo "  download:   $DOWNLOAD ($(( $(stat -c %s "$DOWNLOAD") / 1048576 )) MiB)"
            echo "  sha256:     $DOWNLOAD.sha256"
            echo "  imager:     ${DOWNLOAD%.img*}.json"
        fi
    } >&2
}

# everything above is parsed before anything runs: editing this file during a build is safe
main "$@"; exit
