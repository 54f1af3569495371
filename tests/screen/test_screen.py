"""The local screen (issue 11, item 3): what the SDL child draws, and how it is supervised.

* SDL's ``offscreen`` driver, in this process: ``SDL_RenderReadPixels`` of what the child's
  window code draws equals the given frame, rotated and scaled, with black bars around it.
* Xvfb (SDL's ``x11`` driver) with the real child process started by the real ``Screen``:
  an ``xwd`` dump of the X screen, decoded field by field, shows the frames it was given
  (RGB order, letterbox, rotation 0/90/180/270), no cursor (XFixes), and the last frame stays
  when frames stop. The dumps are saved as PNGs ($SCREEN_PICTURES, default /tmp).
* Supervision with a faked sysfs tree: connectors coming and going restart the child; no
  monitor is a state, not a fault; no DRM device is "off"; a display that cannot be opened
  is one problem naming [display] enabled and the fix, retried with backoff, while the
  frame fan-out keeps serving its other sinks; a killed child is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pictures import read_xwd, write_png  # noqa: E402

from appliance.config.schema import DisplaySection  # noqa: E402
from appliance.media import FrameFanout  # noqa: E402
from appliance.retry import Backoff  # noqa: E402
from appliance.runtimes import Frame  # noqa: E402
from appliance.screen import screen as screen_module  # noqa: E402
from appliance.screen.child import letterbox  # noqa: E402
from appliance.screen.screen import Screen, ScreenState  # noqa: E402
from appliance.status.problems import Problems  # noqa: E402
from appliance.status.server import format_status, prometheus_text  # noqa: E402

PICTURES = Path(os.environ.get("SCREEN_PICTURES", "/tmp"))
COLOURS = [  # no black (the bars are black) and every channel order distinct
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
    (255, 0, 255), (0, 255, 255), (255, 128, 0), (128, 0, 255),
    (0, 128, 64), (200, 200, 200), (96, 48, 16), (16, 64, 200),
]


def pattern(w: int = 160, h: int = 96) -> np.ndarray:
    """4 × 3 blocks of distinct colours: any swap, mirror, turn or stride error changes it."""
    image = np.zeros((h, w, 3), np.uint8)
    for i, colour in enumerate(COLOURS):
        row, col = divmod(i, 4)
        image[row * h // 3:(row + 1) * h // 3, col * w // 4:(col + 1) * w // 4] = colour
    return image


def expected_picture(frame: np.ndarray, rotate: int, out_w: int, out_h: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The frame turned clockwise and scaled to where ``letterbox`` puts it; and that box."""
    r = letterbox(frame.shape[1], frame.shape[0], out_w, out_h, rotate)
    turned = np.rot90(frame, k=-(rotate // 90))
    bw, bh = (r.h, r.w) if rotate in (90, 270) else (r.w, r.h)
    # turned about the rectangle's centre
    bx = max(0, round(r.x + r.w / 2 - bw / 2))
    by = max(0, round(r.y + r.h / 2 - bh / 2))
    bw, bh = min(bw, out_w - bx), min(bh, out_h - by)
    ys = np.arange(bh) * turned.shape[0] // bh
    xs = np.arange(bw) * turned.shape[1] // bw
    return turned[ys][:, xs], (bx, by, bw, bh)


def assert_shows(shot: np.ndarray, frame: np.ndarray, rotate: int, what: str) -> None:
    """``shot`` is ``frame`` turned, scaled and centred, with black bars and nothing else."""
    h, w = shot.shape[:2]
    want, (bx, by, bw, bh) = expected_picture(frame, rotate, w, h)
    got = shot[by:by + bh, bx:bx + bw].astype(int)
    off = np.abs(got - want.astype(int)).max(axis=2) > 24
    # linear filtering blurs the block edges only (~3 % here): a swapped channel, a wrong turn or a
    # stride error changes most of the picture
    assert off.mean() < 0.08, f"{what}: {off.mean():.1%} of the avatar area differs from the frame"
    outside = np.ones((h, w), bool)
    outside[max(by - 2, 0):by + bh + 2, max(bx - 2, 0):bx + bw + 2] = False
    assert shot[outside].max(initial=0) == 0, f"{what}: the bars are not black"
    assert bw * bh < w * h, "the letterbox test needs bars"


# -- offscreen, in this process ------------------------------------------------------------

@pytest.mark.parametrize("rotate", [0, 90, 180, 270])
def test_offscreen_pixels_equal_the_frame(rotate: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sdl2")
    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")
    from appliance.screen.child import Window

    window = Window(rotate)
    try:
        frame = pattern()
        window.upload(frame[:, :, :])
        window.draw()
        shot = window.read_pixels()
        print(f"offscreen {window.renderer_name} {window.out_w}x{window.out_h} rotate {rotate}")
        assert_shows(shot, frame, rotate, f"offscreen, rotate {rotate}")
        # a non-contiguous view (a crop of a bigger frame) is uploaded with its own stride
        big = np.zeros((96, 200, 3), np.uint8)
        big[:, 20:180] = frame
        window.upload(big[:, 20:180])
        window.draw()
        assert_shows(window.read_pixels(), frame, rotate, "cropped view")
    finally:
        window.close()


def test_letterbox_centres_and_fits() -> None:
    assert letterbox(512, 512, 1920, 1080, 0).__dict__ == {"x": 420, "y": 0, "w": 1080, "h": 1080}
    assert letterbox(640, 360, 1280, 720, 0).__dict__ == {"x": 0, "y": 0, "w": 1280, "h": 720}
    # portrait monitor: a 16:9 frame turned by 90 fills the width of a 1080x1920 output
    r = letterbox(640, 360, 1080, 1920, 90)
    assert (r.w, r.h) == (1920, 1080) and (r.x + r.w // 2, r.y + r.h // 2) == (540, 960)


# -- Xvfb, the real child ------------------------------------------------------------------

@pytest.fixture(scope="module")
def xvfb() -> Iterator[str]:
    if shutil.which("Xvfb") is None or shutil.which("xwd") is None:
        pytest.skip("Xvfb or xwd missing (Debian packages xvfb, x11-apps: make setup)")
    pytest.importorskip("sdl2")
    read, write = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x720x24",
                             "-nolisten", "tcp"], pass_fds=(write,), stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as f:
        number = f.readline().strip()
    assert number, "Xvfb did not start"
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


def xwd(display: str) -> np.ndarray:
    dump = subprocess.run(["xwd", "-root", "-silent", "-display", display],
                          capture_output=True, check=True, timeout=30).stdout
    return read_xwd(dump)


class _CursorImage(ctypes.Structure):
    _fields_ = [("x", ctypes.c_short), ("y", ctypes.c_short), ("width", ctypes.c_ushort),
                ("height", ctypes.c_ushort), ("xhot", ctypes.c_ushort), ("yhot", ctypes.c_ushort),
                ("cursor_serial", ctypes.c_ulong), ("pixels", ctypes.POINTER(ctypes.c_ulong)),
                ("atom", ctypes.c_ulong), ("name", ctypes.c_char_p)]


def cursor_visible(display: str) -> bool:
    """Whether the X server's current cursor has any non-transparent pixel (XFixes)."""
    x11, xfixes = ctypes.CDLL("libX11.so.6"), ctypes.CDLL("libXfixes.so.3")
    x11.XOpenDisplay.restype = ctypes.c_void_p
    xfixes.XFixesGetCursorImage.restype = ctypes.POINTER(_CursorImage)
    xfixes.XFixesGetCursorImage.argtypes = [ctypes.c_void_p]
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    dpy = x11.XOpenDisplay(display.encode())
    assert dpy, f"cannot open {display}"
    try:
        ev, err = ctypes.c_int(), ctypes.c_int()
        assert xfixes.XFixesQueryExtension(ctypes.c_void_p(dpy), ctypes.byref(ev), ctypes.byref(err))
        img = xfixes.XFixesGetCursorImage(dpy).contents
        return any((img.pixels[i] >> 24) & 0xFF for i in range(img.width * img.height))
    finally:
        x11.XCloseDisplay(dpy)


async def until(what: str, check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Feeder:
    """Frames into a sink at 25 fps until stopped (the fan-out's job on a kiosk)."""

    def __init__(self, screen: Screen, image: np.ndarray) -> None:
        self.screen, self.image = screen, image
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        audio = np.zeros(640, np.int16)
        while True:
            await self.screen.send_frame(Frame(self.image, audio))
            await asyncio.sleep(0.04)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def run_screen() -> AsyncIterator[Callable[..., Screen]]:
    started: list[tuple[Screen, asyncio.Task[None]]] = []

    def start(display: DisplaySection | None = None, **kw: object) -> Screen:
        problems = kw.pop("problems", None) or Problems()
        screen = Screen(display or DisplaySection(), problems.owner("display"),  # type: ignore[union-attr]
                        **kw)  # type: ignore[arg-type]
        started.append((screen, asyncio.create_task(screen.run())))
        return screen

    yield start
    for screen, task in started:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await screen.close()


async def test_xvfb_shows_the_frames(xvfb: str, run_screen: Callable[..., Screen],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", xvfb)
    assert cursor_visible(xvfb), "Xvfb's root cursor should be visible before the screen starts"
    frame = pattern()
    screen = run_screen(driver="x11", render_driver="opengles2", sysfs=None)
    feeder = Feeder(screen, frame)
    try:
        for rotate in (0, 90, 180, 270):
            if rotate:
                screen.apply(DisplaySection(rotate=rotate))
            await until(f"showing, rotate {rotate}", lambda r=rotate: screen.state is ScreenState.SHOWING
                        and screen.ready.get("rotate") == r and screen.stats.get("frames", 0) > 5)
            shot = xwd(xvfb)
            write_png(PICTURES / f"screen-xvfb-rotate{rotate}.png", shot)
            assert_shows(shot, frame, rotate, f"Xvfb, rotate {rotate}")
            assert not cursor_visible(xvfb), "the cursor shows over the avatar"
        status = screen.status()
        print(f"Xvfb: {screen.summary()}; latency {status['latency_ms']} ms")
        assert status["renderer"] == "opengles2" and status["mode"].startswith("1280x720")
        assert status["fps"] > 5, status  # a rate, not a benchmark: the machine may be busy
        # frames stop: the last good frame stays on the glass, never black
        await feeder.stop()
        await asyncio.sleep(2.0)
        assert screen.state is ScreenState.SHOWING
        shot = xwd(xvfb)
        write_png(PICTURES / "screen-xvfb-frames-stopped.png", shot)
        assert_shows(shot, frame, 270, "2 s after the last frame")
        # and the real face (the reference avatar), upright
        from appliance.runtimes.reference import ReferenceRuntime

        runtime = ReferenceRuntime()
        await runtime.open("")
        face = runtime.next_frame().image
        feeder = Feeder(screen, face)
        screen.apply(DisplaySection(rotate=0))
        await until("showing the face", lambda: screen.ready.get("rotate") == 0 and screen.stats.get("frames", 0) > 5)
        shot = xwd(xvfb)
        write_png(PICTURES / "screen-xvfb-avatar.png", shot)
        assert_shows(shot, face, 0, "the reference avatar")
    finally:
        await feeder.stop()


# -- supervision ---------------------------------------------------------------------------

def fake_sysfs(root: Path, **connectors: str) -> Path:
    for name, state in connectors.items():
        d = root / f"card0-{name}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "status").write_text(state + "\n")
    return root


async def test_connectors_coming_and_going_restart_the_child(
        tmp_path: Path, run_screen: Callable[..., Screen]) -> None:
    pytest.importorskip("sdl2")
    sysfs = fake_sysfs(tmp_path / "drm", **{"HDMI-A-1": "disconnected", "HDMI-A-2": "disconnected"})
    problems = Problems()
    screen = run_screen(driver="offscreen", sysfs=sysfs, problems=problems)
    await until("no display connected", lambda: screen.state is ScreenState.NO_DISPLAY)
    assert screen.pid is None and not problems.list(), "no monitor is a state, not a fault"
    assert "no display connected" in format_status({"display": screen.status()})
    fake_sysfs(sysfs, **{"HDMI-A-2": "connected"})  # a monitor plugged in
    await until("showing", lambda: screen.state is ScreenState.SHOWING)
    first = screen.pid
    assert screen.status()["connector"] == "HDMI-A-2"
    fake_sysfs(sysfs, **{"HDMI-A-1": "connected"})  # a second one: SDL would not notice
    await until("a new child", lambda: screen.state is ScreenState.SHOWING and screen.pid not in (None, first))
    fake_sysfs(sysfs, **{"HDMI-A-1": "disconnected", "HDMI-A-2": "disconnected"})
    await until("no display connected again", lambda: screen.state is ScreenState.NO_DISPLAY)
    assert screen.pid is None
    # a killed (crashed) child is replaced at once
    fake_sysfs(sysfs, **{"HDMI-A-1": "connected"})
    await until("showing again", lambda: screen.state is ScreenState.SHOWING)
    victim = screen.pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    await until("replaced", lambda: screen.state is ScreenState.SHOWING and screen.pid not in (None, victim))
    metrics = prometheus_text(_status_with(screen))
    assert "appliance_screen_up 1" in metrics and "appliance_screen_restarts_total" in metrics


async def test_a_child_slow_to_start_gets_longer_each_time(
        tmp_path: Path, run_screen: Callable[..., Screen], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # stopped mid-start (an overloaded emulated CPU): replaced, and the next start gets twice as
    # long, rather than a restart every STARTUP_S that only starts the slow part over
    pytest.importorskip("sdl2")
    caplog.set_level(logging.INFO, logger="appliance.screen")
    monkeypatch.setattr(screen_module, "STARTUP_S", 2.0)
    sysfs = fake_sysfs(tmp_path / "drm", **{"HDMI-A-1": "connected"})
    screen = run_screen(driver="offscreen", sysfs=sysfs)
    stopped: list[tuple[int, float]] = []
    while len(stopped) < 3:
        await until("a new child", lambda: screen.pid not in (None, *(pid for pid, _ in stopped)), timeout_s=30)
        assert screen.pid is not None and not screen.ready
        os.kill(screen.pid, signal.SIGSTOP)
        stopped.append((screen.pid, time.monotonic()))
    waits = [b - a for (_, a), (_, b) in zip(stopped, stopped[1:], strict=False)]
    print(f"\nscreen children stopped mid-start replaced after {[round(w, 1) for w in waits]} s")
    said = [m for m in caplog.messages if "while starting" in m and m.startswith("screen:")]
    assert "stopped answering for 2 s while starting (the next start gets 4 s)" in said[0], said
    assert "stopped answering for 4 s while starting (the next start gets 8 s)" in said[1], said
    assert waits[1] - waits[0] >= 1.5, waits  # 2 s more to start (the stop and backoff aside)
    for pid, _ in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_no_drm_device_is_off_and_a_bad_display_is_one_problem(
        tmp_path: Path, run_screen: Callable[..., Screen]) -> None:
    pytest.importorskip("sdl2")
    dev = tmp_path / "dri"
    dev.mkdir()
    problems = Problems()
    screen = run_screen(driver="kmsdrm", dev_dri=dev, sysfs=fake_sysfs(tmp_path / "drm", **{"HDMI-A-1": "connected"}),
                        problems=problems, backoff=Backoff(first_s=0.2, max_s=1.0, immediate=True))
    await until("off", lambda: screen.state is ScreenState.OFF)
    assert screen.summary() == f"off: no DRM device ({dev}/card*)" and not problems.list()
    # a device node appears that KMSDRM cannot use (not a DRM device here): a fault, named
    (dev / "card0").write_text("")
    await until("failed", lambda: screen.state is ScreenState.FAILED and screen.restarts >= 2)
    [problem] = problems.list("display")
    assert problem.setting == "[display] enabled" and "[display] enabled = false" in problem.fix, problem
    print(f"bad display: {problem.line()}")
    (dev / "card0").unlink()
    await until("off again", lambda: screen.state is ScreenState.OFF)
    assert not problems.list(), "the problem is dismissed once the cause is gone"


async def test_a_display_that_cannot_open_never_stops_the_other_sinks(
        run_screen: Callable[..., Screen], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sdl2")
    monkeypatch.setenv("DISPLAY", ":97")  # no X server there: "busy"/absent display
    problems = Problems()
    screen = run_screen(driver="x11", sysfs=None, problems=problems,
                        backoff=Backoff(first_s=0.2, max_s=1.0, immediate=True))

    class Recorder:
        frames = 0

        async def send_frame(self, frame: Frame) -> None:
            self.frames += 1

    class Source:
        async def frames(self) -> AsyncIterator[Frame]:
            while True:
                yield Frame(pattern(), np.zeros(640, np.int16))
                await asyncio.sleep(0.02)

    fanout, recorder = FrameFanout(Source()), Recorder()
    fanout.add_sink(screen)
    fanout.add_sink(recorder)
    pump = asyncio.create_task(fanout.run())
    try:
        await until("retried", lambda: screen.restarts >= 3, 30)
        assert screen.state is ScreenState.FAILED
        [problem] = problems.list("display")
        assert problem.line().startswith("[display] enabled: cannot show the avatar on the screen: video:")
        assert recorder.frames > 20 and fanout.frames_sent == recorder.frames
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)


def _status_with(screen: Screen) -> dict[str, object]:
    return {"uptime_s": 1, "fps_10s": 25.0, "renderer": {"restarts": 0, "state": "running"},
            "room": {"frames_published": 0, "state": "live"}, "display": screen.status()}


async def test_the_supervisor_wires_the_screen(tmp_path: Path) -> None:
    """A real supervisor: frames reach the screen sink; no DRM device here is "off", no fault."""
    if Path("/dev/dri").exists() and any(Path("/dev/dri").glob("card*")):
        pytest.skip("this machine has a DRM device: the screen would really start")
    from appliance.config import load_config
    from appliance.supervisor import Supervisor

    conf = tmp_path / "appliance.toml"
    conf.write_text(f'[status]\nsocket = "{tmp_path / "status.sock"}"\n')
    sup = Supervisor(load_config([conf]))
    run = asyncio.create_task(sup.run())
    try:
        await until("frames on the screen sink", lambda: sup.screen is not None and sup.screen.frames_in > 10, 60)
        display = sup.status()["display"]
        assert display["summary"] == "off: no DRM device (/dev/dri/card*)", display
        assert not [p for p in sup.status()["problems"] if p["kind"] == "display"]
        assert "display:  off: no DRM device" in format_status(sup.status())
        assert "appliance_screen_up 0" in prometheus_text(sup.status())
    finally:
        sup.request_stop()
        await asyncio.wait_for(run, 30)


def test_emulated_cpu_is_told_from_cpuinfo(tmp_path: Path) -> None:
    from appliance.screen.screen import emulated_cpu

    tcg, kvm = tmp_path / "tcg", tmp_path / "kvm"
    tcg.write_text("processor\t: 0\nmodel name\t: QEMU TCG CPU version 2.5+\n")
    kvm.write_text("processor\t: 0\nmodel name\t: Intel(R) Celeron(R) J4125 CPU @ 2.00GHz\n")
    assert emulated_cpu(tcg) and not emulated_cpu(kvm) and not emulated_cpu(tmp_path / "missing")
