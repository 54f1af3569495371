#!/bin/bash
# make image-test ARCH=amd64|arm64 [BOARD=...]: build the image (cached), then boot it under QEMU
# (TCG, UEFI, serial console, no network out) with test/appliance.toml on its boot partition,
# echo the console, and check the report: READY, renderer running, the config in effect.
# The Raspberry Pi image cannot be booted by this QEMU (no raspi4 machine in QEMU 7.2): its
# boot partition is checked instead.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ARCH="${1:-amd64}"
BOARD="${2:-}"
BOARD="${BOARD:-$([ "$ARCH" = amd64 ] && echo pc || echo virt)}"

log="${TMPDIR:-/tmp}/image-test-build-$ARCH-$BOARD.log"
"$HERE/build.sh" --arch "$ARCH" --board "$BOARD" --no-compress 2>&1 | tee "$log" >&2
image=$(sed -n 's/^ *raw image: *\([^ ]*\.img\).*/\1/p' "$log")
[ -e "$image" ] || { echo "image-test: no image from the build" >&2; exit 1; }

if [ "$BOARD" = rpi4 ]; then
    offset=$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import qemu_boot, pathlib
print(qemu_boot.boot_partition_offset(pathlib.Path(sys.argv[2])))' "$HERE" "$image")
    export MTOOLS_SKIP_CHECK=1
    listing=$(mdir -b -i "$image@@$offset" ::/)
    for f in start4.elf fixup4.dat config.txt cmdline.txt bcm2711-rpi-4-b.dtb appliance.toml.example; do
        grep -q "/$f\$" <<< "$listing" || { echo "image-test: $f missing on the boot partition" >&2; exit 1; }
    done
    grep -q 'vmlinuz-' <<< "$listing" && grep -q 'initrd.img-' <<< "$listing" || { echo "image-test: kernel/initrd missing" >&2; exit 1; }
    cmdline=$(mtype -i "$image@@$offset" ::/cmdline.txt)
    grep -q 'root=LABEL=kiosk-root' <<< "$cmdline" || { echo "image-test: cmdline.txt: $cmdline" >&2; exit 1; }
    echo "image-test: rpi4 boot partition ok (cmdline: $cmdline)"
    echo "image-test: the Raspberry Pi image is not booted here: QEMU 7.2 has no raspi4 machine."
    exit 0
fi

exec python3 "$HERE/qemu_boot.py" "$image" --arch "$ARCH" --boot-file "appliance.toml=$HERE/test/appliance.toml"
