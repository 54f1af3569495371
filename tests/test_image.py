"""The flashable image boots into a running appliance (issue 6).

Builds the amd64 UEFI image with image-build/build.sh (cached under
/var/cache/appliance-image: a warm build takes about a minute), then boots it under
qemu-system-x86_64 with `-accel tcg`, OVMF, a serial console and restricted user-mode
networking (nothing leaves the machine; the LiveKit room is unreachable), twice:

* with an invalid /boot/firmware/appliance.toml: it is not applied, the console says why
  (file:line: key), and the appliance runs on the image's defaults;
* with a valid one: it is applied (the room name shows in `appliance status`), and the room
  is *waiting*, not failed, while the renderer is warm.

What the test reads is what an operator sees on a screen or serial cable: the image's
appliance-boot-report.service prints `appliance status` on every console once
appliance.service is READY. Nothing test-only is in the image; the test only writes files
onto the boot partition of a scratch copy.

The amd64 boots have a screen (virtio-vga 1280x720, `-display none`). With the invalid config
(the defaults: no room to join) the test takes QMP screendumps after READY until the avatar is
on the screen — letterboxed in black, matching a reference frame rendered here, no console
text or cursor over it — and saves them as PNGs ($SCREEN_PICTURES, default /tmp). That boot
also has the test's SSH key on its boot partition; over SSH, as an operator would, it makes
the avatar speak (`sudo appliance say -` with a WAV: the mouth must move on the screen), then
unplugs the monitor and plugs it back (the DRM connector's sysfs status forced "off", then
"detect"): the screen must say "no display connected", then show the avatar again. The valid
config points the kiosk at a dev server inside the test's network namespace
(tests/guest_room.py: QEMU's user-mode network, unrestricted there, reaches that namespace and
nothing beyond), with a token_url, so no secret goes onto the image: the booted kiosk's avatar
and visitor participants must join that room over WebRTC. (Both at once, the screen and the
room, are too much for TCG on a 2-core host: measured, the guest rendered 2.8 fps and its
screen and audio children starved; see the notes of issue 11.)

Then the generic arm64 image under qemu-system-aarch64 -M virt (AAVMF), with the valid config:
its rootfs is built through qemu-user (~5-9 min cold, cached after), it boots to READY in
~2 min under TCG. IMAGE_TEST_ARM64=0 skips it.
Needs root, mmdebstrap, genimage, mtools, qemu-system-x86 and ovmf; skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "image-build"))

import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import qemu_boot  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from guest_room import GuestRoom, GuestShell, free_port  # noqa: E402
from pictures import read_ppm, write_png  # noqa: E402

from appliance.dev import netns  # noqa: E402
from appliance.runtimes.reference import ReferenceRuntime, mouth_box_for, mouth_open_fraction  # noqa: E402

BUILD_TIMEOUT_S = 1800
BOOT_TIMEOUT_S = 900
SCREEN = (1280, 720)
SCREEN_WAIT_S = 300  # virtio-gpu shows up 40-50 s into a TCG boot; llvmpipe draws ~4 fps
PICTURES = Path(os.environ.get("SCREEN_PICTURES", "/tmp"))

BAD_CONFIG = """\
# an operator's typos
[livekit]
room = "museum-lobby"
retry_max_s = "soon"

[avatar]
runtime = "hologram"
"""

# Valid, and everything it points at is inside the VM's own loopback: the token fetch and the
# LiveKit connection are refused at once, so the room waits and retries.
GOOD_CONFIG = """\
[livekit]
url = "ws://127.0.0.1:7880"
room = "museum-lobby"
token_url = "http://127.0.0.1:9/token"
connect_timeout_s = 3.0
retry_max_s = 10.0
"""

# The amd64 kiosk joins a real room: a dev server in the test's namespace (tests/guest_room.py).
ROOM_CONFIG = """\
[livekit]
url = "{url}"
room = "museum-lobby"
token_url = "{token_url}"
connect_timeout_s = 20.0
retry_max_s = 5.0
"""

def _missing_tools(arch: str) -> list[str]:
    tools = ["mmdebstrap", "genimage", "mcopy", "mkfs.vfat", "mke2fs", "zstd"]
    tools.append("qemu-system-x86_64" if arch == "amd64" else "qemu-system-aarch64")
    if arch == "arm64":
        tools.append("qemu-aarch64-static")
    missing = [t for t in tools if shutil.which(t) is None]
    missing += [f for f in qemu_boot.FIRMWARE[arch] if not Path(f).exists()]
    return missing


def build(arch: str, board: str) -> Path:
    if os.geteuid() != 0:
        pytest.skip("building an image needs root (mmdebstrap --mode=root, chroot)")
    missing = _missing_tools(arch)
    if missing:
        pytest.skip(f"image tools missing: {', '.join(missing)} (see image-build/README.md)")
    # the test process lives in a private network namespace (conftest.py); a cold cache must
    # reach the Debian mirror and PyPI, so the build runs in the namespace pytest came from
    cmd = [str(REPO / "image-build" / "build.sh"), "--arch", arch, "--board", board, "--no-compress"]
    done = netns.run_outside(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    print(done.stderr[-3000:])
    assert done.returncode == 0, f"image build failed:\n{done.stderr[-4000:]}"
    match = re.search(r"raw image:\s+(\S+\.img)", done.stderr)
    assert match, done.stderr[-2000:]
    return Path(match.group(1))


@pytest.fixture(scope="module")
def amd64_image() -> Path:
    return build("amd64", "pc")


def _boot(image: Path, arch: str, files: dict[str, str], name: str, tmp: Path,
          after_report: object = None, **network: Any) -> qemu_boot.BootResult:
    log = tmp / f"console-{name}.log"
    result = qemu_boot.boot_image(image, arch, dict(files), grow_mib=1024,
                                  timeout_s=BOOT_TIMEOUT_S, log_path=log,
                                  screen=SCREEN if arch == "amd64" else None,
                                  after_report=after_report, **network)  # type: ignore[arg-type]
    print(f"\n--- {arch} boot '{name}': console report (full console: {log})")
    for line in result.report:
        print(f"  {line}")
    if result.ready_s is not None:
        print(f"{arch} boot '{name}': boot to READY {result.ready_s:.1f} s (QEMU start to the "
              f"'appliance: READY' line, TCG)")
    assert result.finished, (
        f"no boot report within {BOOT_TIMEOUT_S} s; end of the console:\n"
        + "\n".join(line for _, line in result.console[-60:])
    )
    return result


def _assert_running(result: qemu_boot.BootResult) -> None:
    assert result.find(r"^READY "), "appliance.service did not reach READY"
    assert result.find(r"renderer: running"), "the renderer is not running"
    # frames flow; how many a second depends on the emulation: 4.8-7 on a quiet 2-core host,
    # 0.6 measured on a slow one (frame interval p50 1.6-1.7 s, READY 215-240 s after start)
    fps = result.find(r"^\s*fps:\s+([0-9.]+)")
    assert fps, result.report
    # on an overloaded guest the 10 s window right after READY can hold no frame (measured: 0.0
    # fps at READY + 30 s, frame interval p50 1.7 s); a hold loop recorded in this boot means
    # 50 real frames were rendered since it started
    recorded = result.find(r"^\s*hold:.*\(loop: recorded\)")
    assert float(re.search(r"fps:\s+([0-9.]+)", fps).group(1)) > 0.0 or recorded, (fps, recorded)  # type: ignore[union-attr]
    # per machine: a LiveKit identity and hostname derived from this machine's ID
    assert result.find(r"LiveKit identity is kiosk-[0-9a-f]{8}$")
    # the first boot grew the root filesystem into the space added to the disk
    assert result.find(r"root filesystem grown from \d+ MiB to \d+ MiB")


@pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + SCREEN_WAIT_S + 400)
def test_bad_boot_config_keeps_defaults_and_the_screen_speaks(amd64_image: Path, tmp_path: Path) -> None:
    shell = GuestShell(tmp_path, free_port())
    files = {"appliance.toml": BAD_CONFIG, "authorized_keys": shell.public_key}
    result = _boot(amd64_image, "amd64", files, "bad-config", tmp_path,
                   after_report=visit(shell), ssh_port=shell.port)
    v: Visit = result.screen  # type: ignore[assignment]
    assert v is not None, "no screendumps: the boot report never ended"
    print_dumps(v.boot)
    assert v.boot[-1][2] is None, "the avatar never showed on the screen"
    assert sum(verdict is None for _, _, verdict in v.boot) >= 3, "the avatar did not stay on the screen"
    # the console says the file was not applied, and why, with file:line: key
    assert result.find(r"boot config /boot/firmware/appliance.toml NOT applied"), result.report
    assert result.find(r"/boot/firmware/appliance.toml:4: \[livekit\] retry_max_s"), result.report
    assert result.find(r"/boot/firmware/appliance.toml:7: \[avatar\] runtime"), result.report
    _assert_running(result)
    # the defaults run: the image's room, not the rejected file's
    room = result.find(r"^\s*room:")
    assert room and re.search(r"room:\s+lobby at ", room), room
    assert not result.find(r"museum-lobby")
    # SSH: enabled for the operator account with the key from the boot partition
    assert result.find(r"SSH enabled \(keys only\): ssh kiosk@kiosk-[0-9a-f]{8}"), result.report
    assert result.find(r"^SSH: on"), result.report
    # speaking, with no room: `appliance say` moves the mouth on the screen
    print(f"appliance say in the guest: {v.said.strip()!r}; mouth open on the screen (dark share of "
          f"the mouth box): idle {', '.join(f'{m:.3f}' for m in v.idle_mouth)}; after `say` "
          f"{', '.join(f'{m:.3f}' for _, m in v.speaking_mouth)}")
    assert v.said.startswith("speaking 4.57 s"), v.said
    idle = max(v.idle_mouth)
    mouths = [m for _, m in v.speaking_mouth]
    assert max(mouths) > max(0.06, 2.5 * idle), (v.idle_mouth, mouths)
    assert max(mouths) - min(mouths) > 0.03, "the mouth did not move"
    # unplugged: the screen says so; plugged back: the avatar again, within seconds
    print(f"{v.connector} forced off: " + "; ".join(f"{t:.0f} s {verdict or 'avatar'}"
                                                    for t, _, verdict in v.unplugged))
    print(f"display while unplugged: {v.unplugged_display}")
    assert v.unplugged_display["state"] == "no display connected", v.unplugged_display
    back = next((t for t, _, verdict in v.replugged if verdict is None), None)
    print(f"{v.connector} detected again: the avatar back on the screen after "
          f"{back if back is not None else 'never'} s (a screendump every 1 s); display {v.display}")
    assert back is not None and back < 30, v.replugged
    assert v.display["state"] == "showing" and v.display["connector"], v.display
    print(f"plugged back: {v.moving_after:.2%} of the screen changed within 1 s (the avatar sways)")
    assert v.moving_after > 0.001, "the screen is not being drawn after the replug"


def reference_picture() -> np.ndarray:
    """The image's default avatar at rest, as the kiosk renders it (512x512, RGB)."""
    runtime = ReferenceRuntime()
    asyncio.run(runtime.open(""))
    return runtime.next_frame().image


def avatar_on_screen(dump: np.ndarray, frame: np.ndarray) -> str | None:
    """None if ``dump`` is the avatar letterboxed on black with nothing over it, else why not."""
    h, w = dump.shape[:2]
    side = min(w, h)  # a square frame: pillarboxed on a landscape screen
    x0 = (w - side) // 2
    if dump.max() == 0:
        return "black"
    bars = np.concatenate([dump[:, : x0 - 2], dump[:, x0 + side + 2:]], axis=1)
    if bars.max() != 0:
        return f"the black bars are not black ({np.count_nonzero(bars.max(axis=2))} lit pixels: console text?)"
    area = dump[2:-2, x0 + 2: x0 + side - 2].astype(int)
    ys = np.arange(2, h - 2) * frame.shape[0] // side
    xs = np.arange(2, side - 2) * frame.shape[1] // side
    want = frame[ys][:, xs].astype(int)
    # the sway and blinks move a few pixels; text, a cursor or a wrong picture differ far more
    differs = (np.abs(area - want).max(axis=2) > 48).mean()
    if differs > 0.10:
        return f"{differs:.0%} of the avatar area differs from the avatar"
    return None


def screendump(qmp: qemu_boot.Qmp) -> np.ndarray:
    ppm = qmp.screendump(Path(f"/tmp/kiosk-screendump-{os.getpid()}.ppm"))
    picture = read_ppm(ppm.read_bytes())
    ppm.unlink()
    return picture


def dumps_until(qmp: qemu_boot.Qmp, name: str, wait_s: float, every_s: float = 5.0,
                then: int = 2, shown: bool = True) -> list[tuple[float, Path, str | None]]:
    """Screendumps every ``every_s`` until the avatar is on the screen (``shown=False``: until
    it is not), then ``then`` more, or until ``wait_s`` passed: (seconds, PNG, why it is not
    the avatar)."""
    frame, hits = reference_picture(), 0
    dumps: list[tuple[float, Path, str | None]] = []
    start = time.monotonic()
    while time.monotonic() - start < wait_s and hits <= then:
        t = time.monotonic() - start
        picture = screendump(qmp)
        path = write_png(PICTURES / f"screen-{name}-{len(dumps):02d}.png", picture)
        verdict = avatar_on_screen(picture, frame)
        dumps.append((round(t, 1), path, verdict))
        hits += (verdict is None) == shown
        if hits <= then:
            time.sleep(every_s)
    return dumps


def print_dumps(dumps: list[tuple[float, Path, str | None]]) -> None:
    print("screendumps after the boot report (seconds after it, file, what was wrong):")
    for t, path, verdict in dumps:
        print(f"  {t:6.1f} s  {path}  {verdict or 'the avatar, letterboxed, nothing over it'}")


def mouth_on_screen(picture: np.ndarray) -> float:
    """The dark share of the avatar's mouth box, where the letterboxed screen shows it."""
    h, w = picture.shape[:2]
    side = min(w, h)
    x0, scale = (w - side) // 2, side / 512
    bx0, by0, bx1, by1 = mouth_box_for("", 512, 512)
    box = (x0 + int(bx0 * scale), int(by0 * scale), x0 + int(bx1 * scale) + 1, int(by1 * scale) + 1)
    return mouth_open_fraction(picture, box)


@dataclass
class Visit:
    """What the booted kiosk's screen showed: the avatar, speaking, unplugged, plugged back."""

    boot: list[tuple[float, Path, str | None]]
    idle_mouth: list[float] = field(default_factory=list)
    said: str = ""
    speaking_mouth: list[tuple[float, float]] = field(default_factory=list)  # (s after `say`, mouth)
    connector: str = ""
    unplugged: list[tuple[float, Path, str | None]] = field(default_factory=list)
    unplugged_display: dict[str, Any] = field(default_factory=dict)
    replugged: list[tuple[float, Path, str | None]] = field(default_factory=list)
    display: dict[str, Any] = field(default_factory=dict)
    moving_after: float = 0.0  # share of pixels that changed between dumps 1 s apart, plugged back


SPEECH = REPO / "appliance" / "data" / "hello.wav"  # 4.6 s, also on the image
SPEAKING_WATCH_S = 25.0  # `say` returns before the speech is heard; TCG renders ~5 fps


def visit(shell: GuestShell) -> Callable[[qemu_boot.Qmp, qemu_boot.BootResult], Visit]:
    """After the boot report, as an operator at the kiosk with SSH would see it."""
    def run(qmp: qemu_boot.Qmp, result: qemu_boot.BootResult) -> Visit:
        v = Visit(boot=dumps_until(qmp, "boot", SCREEN_WAIT_S))
        if v.boot[-1][2] is not None:
            return v
        for _ in range(6):
            v.idle_mouth.append(mouth_on_screen(screendump(qmp)))
            time.sleep(0.5)
        # the avatar speaks with no room: `appliance say`, typed over SSH
        v.said = shell.run("sudo appliance say -", stdin=SPEECH.read_bytes())
        said = time.monotonic()
        while (t := time.monotonic() - said) < SPEAKING_WATCH_S:
            picture = screendump(qmp)
            v.speaking_mouth.append((round(t, 1), mouth_on_screen(picture)))
            write_png(PICTURES / f"screen-speaking-{len(v.speaking_mouth):02d}.png", picture)
            time.sleep(0.3)
        # the monitor unplugged and plugged back in: the connector's status forced off, then
        # probed again (what the kernel does on a hotplug interrupt)
        listing = shell.run("grep -H . /sys/class/drm/card*-*/status")
        v.connector = next(line.rsplit(":", 1)[0] for line in listing.splitlines()
                           if line.endswith(":connected"))
        shell.run(f"echo off | sudo tee {v.connector} >/dev/null")
        v.unplugged = dumps_until(qmp, "unplugged", 30, every_s=2.0, then=0, shown=False)
        v.unplugged_display = json.loads(shell.run("sudo appliance status --json"))["display"]
        shell.run(f"echo detect | sudo tee {v.connector} >/dev/null")
        v.replugged = dumps_until(qmp, "replugged", 90, every_s=1.0, then=1)
        v.display = json.loads(shell.run("sudo appliance status --json"))["display"]
        # drawn again, not a picture the unplugged connector kept: the idle avatar sways
        first = screendump(qmp)
        time.sleep(1.0)
        v.moving_after = float((np.abs(screendump(qmp).astype(int) - first).max(axis=2) > 16).mean())
        return v

    return run


def joined(room: GuestRoom) -> Callable[[qemu_boot.Qmp, qemu_boot.BootResult], list[str]]:
    """After the boot report: wait until the booted kiosk's avatar and visitor are in the room."""
    def run(qmp: qemu_boot.Qmp, result: qemu_boot.BootResult) -> list[str]:
        named = re.search(r"kiosk-[0-9a-f]{8}", result.find(r"LiveKit identity is") or "")
        if named is None:
            return []
        wanted = {named.group(0), f"{named.group(0)}-visitor"}
        deadline = time.monotonic() + 180
        while not wanted <= set(room.server.participants("museum-lobby")) and time.monotonic() < deadline:
            time.sleep(1.0)
        return room.server.participants("museum-lobby")

    return run


# Known failure on slow hosts (measured 2026-12-03: READY 215-355 s after QEMU start): the kiosk
# joins the room (both participants seen by the test's server), then its status socket is gone
# when the boot report asks, i.e. the daemon exited or was restarted (the watchdog, most
# likely); this boot has SSH off, so the journal was not read. Issue 11 stays open for it.
# Re-measured the same boot with SSH on, twice (2026-12-03): NRestarts=0 for 200 s after the
# report, fps 0.0 then 1.0 with a guest load average of 8-10; the load was the renderer's spare
# and the screen child killed mid-import every 60/90 s and started again (now backed off: 53adfe9).
# The socket-gone symptom was not seen again; the mark stays until CI shows it passing.
@pytest.mark.xfail(reason="the daemon goes away after joining the room on a slow TCG host (issue 11)",
                   strict=False)
@pytest.mark.timeout(BUILD_TIMEOUT_S + BOOT_TIMEOUT_S + 300)
def test_valid_boot_config_is_applied_and_the_kiosk_joins_the_room(
        amd64_image: Path, tmp_path: Path, media_host: str) -> None:
    room = GuestRoom(media_host)
    try:
        files = {"appliance.toml": ROOM_CONFIG.format(url=room.url, token_url=room.token_url)}
        result = _boot(amd64_image, "amd64", files, "good-config", tmp_path,
                       after_report=joined(room), open_network=True)
    finally:
        room.close()
    assert result.find(r"boot config /boot/firmware/appliance.toml is in effect"), result.report
    assert not result.find(r"NOT applied")
    _assert_running(result)
    identity = re.search(r"kiosk-[0-9a-f]{8}", result.find(r"LiveKit identity is") or "")
    assert identity, result.report
    kiosk = identity.group(0)
    # applied: the room from the boot partition, joined over WebRTC with tokens from token_url
    room_line = result.find(r"^\s*room:")
    assert room_line and re.search(r"room:\s+museum-lobby at ws://", room_line), room_line
    print(f"in the dev server's room: {result.screen}; token requests: {room.token_requests}")
    assert (kiosk, "agent") in room.token_requests, room.token_requests  # the avatar
    assert (f"{kiosk}-visitor", "standard") in room.token_requests, room.token_requests
    assert {kiosk, f"{kiosk}-visitor"} <= set(result.screen or []), result.screen  # type: ignore[arg-type]
    # no key on the boot partition: nothing listens on port 22 (not even socket activation)
    assert result.find(r"^SSH: off"), result.report


@pytest.mark.skipif(os.environ.get("IMAGE_TEST_ARM64") == "0", reason="IMAGE_TEST_ARM64=0")
@pytest.mark.timeout(2 * BUILD_TIMEOUT_S + 2 * BOOT_TIMEOUT_S)
def test_arm64_virt_image_boots(tmp_path: Path) -> None:
    image = build("arm64", "virt")
    result = _boot(image, "arm64", {"appliance.toml": GOOD_CONFIG}, "arm64-virt", tmp_path)
    assert result.find(r"boot config /boot/firmware/appliance.toml is in effect"), result.report
    _assert_running(result)
    room = result.find(r"^\s*room:")
    assert room and "museum-lobby" in room and "waiting" in room, room
