#!/bin/bash
# mmdebstrap --setup-hook: runs before any package is unpacked into "$1".
# Settings that must be in place before the kernel's initramfs is first built.
set -euo pipefail
root="$1"
here="$(dirname "$(readlink -f "$0")")"

# A small initramfs: only the modules a kiosk boots from (see initramfs-modules).
# With the default MODULES=most, arm64 under qemu-user takes ~25 min instead of ~4.
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\nCOMPRESS=zstd\n' > "$root/etc/initramfs-tools/conf.d/appliance.conf"
grep -v '^#' "$here/initramfs-modules" > "$root/usr/share/initramfs-tools/modules.d/appliance"

# The kernel image and initramfs go to the ESP/boot partition from /boot; keep the
# /boot/firmware mount point present so raspi-firmware's hooks find it.
mkdir -p "$root/boot/firmware"
