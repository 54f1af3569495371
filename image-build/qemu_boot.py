#!/usr/bin/env python3
"""Boot a kiosk image under QEMU (TCG) and read what it says on its serial console.

    python3 image-build/qemu_boot.py IMAGE [--arch amd64|arm64] [--boot-file NAME=PATH ...]
                                          [--grow-mib N] [--timeout S] [--keep]

The image is never changed: it is copied (sparse) to a scratch file, the given files are put
onto its boot partition (FAT, with mtools: no loop devices, no mounts), the copy is grown by
--grow-mib (first boot grows the root filesystem), and QEMU boots it with UEFI firmware
(OVMF / AAVMF), `-accel tcg`, a serial console, and user-mode networking with restrict=on:
DHCP works, nothing leaves the machine, the LiveKit room is unreachable. A caller that lives
in a private network namespace with no route out (the test suite) may lift the restriction
(``open_network=True``): the guest then reaches that namespace's own addresses, e.g. a dev
server on 10.213.0.1, over TCP and UDP (WebRTC), and still nothing beyond it.

The shipped image prints its state on every console once appliance.service is READY
(appliance-boot-report.service): lines starting with "appliance:". This module waits for
that report and returns it parsed. Used by tests/test_image.py and `make image-test`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BootResult", "Qmp", "boot_image", "put_boot_files"]

FIRMWARE = {
    "amd64": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "arm64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
}


@dataclass
class BootResult:
    console: list[tuple[float, str]]  # (seconds since QEMU started, line)
    ready_s: float | None  # host time from QEMU start to the "appliance: READY" line
    report: list[str] = field(default_factory=list)  # the "appliance: ..." lines, prefix removed
    finished: bool = False  # the status report ended (or NOT READY was reported)
    timed_out: bool = False
    screen: object = None  # what ``after_report`` returned (e.g. screendumps)

    def text(self) -> str:
        return "\n".join(line for _, line in self.console)

    def find(self, pattern: str) -> str | None:
        for line in self.report:
            if re.search(pattern, line):
                return line
        return None


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def boot_partition_offset(image: Path) -> int:
    """Byte offset of the first partition (the ESP / Raspberry Pi boot partition), MBR or GPT."""
    with open(image, "rb") as f:
        mbr = f.read(512)
        if mbr[510:512] != b"\x55\xaa":
            raise ValueError(f"{image}: no partition table")
        first = mbr[446:462]
        if first[4] != 0xEE:  # MBR: the first entry's start LBA
            return int.from_bytes(first[8:12], "little") * 512
        f.seek(512)  # GPT header
        header = f.read(92)
        if header[:8] != b"EFI PART":
            raise ValueError(f"{image}: protective MBR without a GPT header")
        f.seek(int.from_bytes(header[72:80], "little") * 512)
        entry = f.read(128)
        return int.from_bytes(entry[32:40], "little") * 512


def put_boot_files(image: Path, files: dict[str, Path | str | bytes]) -> None:
    """Write files onto the image's boot partition (FAT) with mtools."""
    target = f"{image}@@{boot_partition_offset(image)}"
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            src = Path(tmp) / name
            if isinstance(content, bytes):
                src.write_bytes(content)
            elif isinstance(content, Path):
                shutil.copyfile(content, src)
            else:
                src.write_text(content)
            _run(["mcopy", "-o", "-i", target, str(src), f"::/{name}"], env=env)


def boot_image(
    image: Path,
    arch: str = "amd64",
    boot_files: dict[str, Path | str | bytes] | None = None,
    grow_mib: int = 1024,
    timeout_s: float = 600.0,
    memory_mib: int = 2048,
    cpus: int = 2,
    log_path: Path | None = None,
    echo: bool = False,
    keep_disk: Path | None = None,
    screen: tuple[int, int] | None = None,
    after_report: Callable[[Qmp, BootResult], object] | None = None,
    open_network: bool = False,
    ssh_port: int | None = None,
) -> BootResult:
    """Boot a scratch copy of ``image`` and collect the console until the boot report ends.

    ``screen=(w, h)`` (amd64) adds a virtio-vga display of that size (nothing is shown on the
    host: ``-display none``); ``after_report(qmp, result)`` then runs once the report ended,
    before QEMU is stopped, with a QMP connection (``qmp.screendump(path)``).

    ``open_network``: user-mode networking without restrict=on. Only inside a network
    namespace that routes nowhere (see the module's docstring). ``ssh_port``: the guest's port
    22 answers on the caller's 127.0.0.1:ssh_port (a forward works with restrict=on too)."""
    code, vars_template = FIRMWARE[arch]
    with tempfile.TemporaryDirectory(prefix="kiosk-boot-", dir=os.environ.get("IMAGE_SCRATCH")) as tmp:
        disk = Path(tmp) / "disk.img"
        _run(["cp", "--sparse=always", "--reflink=auto", str(image), str(disk)])
        if boot_files:
            put_boot_files(disk, boot_files)
        if grow_mib:
            with open(disk, "r+b") as f:
                f.truncate(disk.stat().st_size + grow_mib * 1048576)
        nvram = Path(tmp) / "vars.fd"
        shutil.copyfile(vars_template, nvram)
        if arch == "amd64":
            # -cpu max: numpy's wheel (OpenBLAS) needs AVX2 (SIGILL at import without it,
            # measured with qemu-x86_64 -cpu qemu64,+sse4.2,... / Nehalem-v2 / max,-avx2).
            # Mesa's llvmpipe crashes on AVX2 gathers under QEMU 7.2 TCG: the screen child
            # caps Mesa's CPU features on an emulated CPU (appliance/screen/screen.py)
            machine = ["qemu-system-x86_64", "-machine", "q35", "-cpu", "max"]
            nic = "virtio-net-pci"
        else:
            # cortex-a72 (the Pi 4 core): "max" adds pointer authentication, slow under TCG
            machine = ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72"]
            nic = "virtio-net-pci"
        cmd = [
            *machine, "-accel", "tcg", "-m", str(memory_mib), "-smp", str(cpus),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={nvram}",
            "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
            # user-mode network, restricted: DHCP inside, no packet leaves the host
            "-nic", f"user,model={nic}" + ("" if open_network else ",restrict=on")
            + (f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22" if ssh_port else ""),
            "-device", "virtio-rng-pci",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        ]
        qmp_path = Path(tmp) / "qmp.sock"
        if screen is not None:
            cmd += ["-vga", "none", "-device", f"virtio-vga,xres={screen[0]},yres={screen[1]}"]
        if after_report is not None:
            cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]

        def with_qmp(r: BootResult) -> object:
            assert after_report is not None
            qmp = Qmp(qmp_path)
            try:
                return after_report(qmp, r)
            finally:
                qmp.close()

        result = _watch(cmd, timeout_s, log_path, echo, None if after_report is None else with_qmp)
        if keep_disk is not None:
            shutil.move(disk, keep_disk)
        return result


class Qmp:
    """A QMP connection to the running QEMU (one command at a time)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        while True:
            msg = json.loads(self._file.readline())
            if "event" not in msg:  # events come in between; not what we wait for
                return msg  # type: ignore[no-any-return]

    def command(self, name: str, **arguments: object) -> object:
        self._file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self._file.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"QMP {name}: {answer['error']}")
        return answer.get("return")

    def screendump(self, path: Path) -> Path:
        """What the guest's display shows now, as a PPM file (QEMU's default format)."""
        self.command("screendump", filename=str(path))
        return path

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def _watch(cmd: list[str], timeout_s: float, log_path: Path | None, echo: bool,
           after_report: Callable[[BootResult], object] | None = None) -> BootResult:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    result = BootResult(console=[], ready_s=None)
    log = open(log_path, "w", encoding="utf-8", errors="replace") if log_path else None
    done = threading.Event()
    last_report = [0.0]

    def reader() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            # strip terminal escapes and carriage returns from the serial stream
            line = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r", "", raw.decode("utf-8", "replace")).rstrip("\n")
            now = time.monotonic() - t0
            result.console.append((now, line))
            if log:
                log.write(f"[{now:7.1f}] {line}\n")
                log.flush()
            if echo:
                print(f"[{now:7.1f}] {line}", flush=True)
            m = re.search(r"appliance: (.*)$", line)
            if m:
                result.report.append(m.group(1))
                last_report[0] = time.monotonic()
                if m.group(1).startswith("READY") and result.ready_s is None:
                    result.ready_s = now
                # the end of the report: the status block's fps line, or a NOT READY
                if re.match(r"\s*fps:|NOT READY|appliance is not running", m.group(1)):
                    result.finished = True
                    done.set()
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        result.timed_out = True
    elif result.finished:
        # a "problem:" line may follow the fps line
        time.sleep(2.0)
    try:
        if after_report is not None and result.finished and proc.poll() is None:
            result.screen = after_report(result)
    finally:  # a failed check must not leave QEMU running
        proc.kill()
        proc.wait()
        thread.join(5)
        if log:
            log.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--arch", default="amd64", choices=sorted(FIRMWARE))
    parser.add_argument("--boot-file", action="append", default=[], metavar="NAME=PATH",
                        help="put PATH onto the boot partition as NAME (repeatable)")
    parser.add_argument("--grow-mib", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--log", type=Path, help="write the console here too")
    parser.add_argument("--quiet", action="store_true", help="do not echo the console")
    parser.add_argument("--keep-disk", type=Path, help="keep the booted disk here (to inspect it)")
    args = parser.parse_args()
    files: dict[str, Path | str | bytes] = {}
    for spec in args.boot_file:
        name, _, path = spec.partition("=")
        files[name] = Path(path)
    result = boot_image(args.image, args.arch, files, args.grow_mib, args.timeout,
                        log_path=args.log, echo=not args.quiet, keep_disk=args.keep_disk)
    print()
    if result.ready_s is not None:
        print(f"boot to READY (QEMU start → 'appliance: READY' on the console): {result.ready_s:.1f} s")
    for line in result.report:
        print(f"  {line}")
    if not result.finished:
        print("no boot report on the console" + (" (timed out)" if result.timed_out else ""))
        return 1
    ok = result.find(r"^READY") is not None and result.find(r"renderer: running") is not None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
