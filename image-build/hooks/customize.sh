#!/bin/bash
# mmdebstrap --customize-hook: runs after all packages are installed in "$1".
# Everything slow or package-related that the cached rootfs layer holds: users,
# the Python dependency layer of the venv, services on/off, board firmware setup.
# (The appliance itself, its units and config are added per build by build.sh.)
# Environment from build.sh: IMG_ARCH, IMG_BOARD, IMG_WHEELHOUSE.
set -euo pipefail
root="$1"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

echo "customize: users"
# The daemon's own user and the gpio group come from systemd/sysusers.d (applied by build.sh).
# The operator account "kiosk" (Debian already has a group "operator") for SSH with a key from the boot partition: no password at all
# (locked), sudo without one. Root is locked as well.
in_root useradd --create-home --shell /bin/bash --groups sudo,adm,systemd-journal \
    --comment "kiosk operator (SSH keys from the boot partition)" kiosk
in_root passwd --lock kiosk >/dev/null
in_root passwd --lock root >/dev/null
printf 'kiosk ALL=(ALL) NOPASSWD: ALL\n' > "$root/etc/sudoers.d/kiosk"
chmod 0440 "$root/etc/sudoers.d/kiosk"

echo "customize: venv with the dependency layer (offline, from the wheelhouse)"
mkdir -p "$root/tmp/wheelhouse"
cp "$IMG_WHEELHOUSE"/* "$root/tmp/wheelhouse/"
# --system-site-packages: pyaudio and systemd-python come from Debian (python3-pyaudio,
# python3-systemd), so nothing is compiled and no compiler is in the image.
in_root python3 -m venv --system-site-packages /opt/appliance/venv
in_root /opt/appliance/venv/bin/pip install --quiet --no-index --no-cache-dir \
    --find-links /tmp/wheelhouse -r /tmp/wheelhouse/requirements.txt
rm -rf "$root/tmp/wheelhouse"

echo "customize: services"
# SSH stays off until appliance-firstboot finds an operator key on the boot partition;
# host keys are generated on the device, never shipped.
in_root systemctl disable ssh.service >/dev/null 2>&1 || true
rm -f "$root"/etc/ssh/ssh_host_*
in_root systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service

if [ "$IMG_BOARD" = rpi4 ]; then
    echo "customize: raspi-firmware (config.txt, cmdline.txt on /boot/firmware)"
    sed -i -e 's|^#ROOTPART=.*|ROOTPART="LABEL=kiosk-root"|' \
           -e 's|^#CONSOLES=.*|CONSOLES="ttyS1,115200 tty0"|' "$root/etc/default/raspi-firmware"
    echo "quiet" > "$root/etc/default/raspi-extra-cmdline"
    in_root env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware
    cat "$root/boot/firmware/cmdline.txt"
fi
