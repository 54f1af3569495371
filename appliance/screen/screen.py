"""The local screen, supervisor side: a frame sink and the supervision of the screen child.

    screen = Screen(config.display, problems.owner("display"), on_state=...)
    fanout.add_sink(screen)        # every frame goes into shared memory (a copy, ~0.1 ms)
    task = spawn(screen.run())     # the child: started, watched, restarted with backoff
    screen.status()                # state, connector, mode, fps, latency

The child (``child.py``) draws with SDL2 and can crash, hang or fail to find a
monitor without touching the room or the renderer: the sink only writes
memory, and the child reads it. SDL enumerates connectors once, so this side
polls sysfs (``connectors.py``) and restarts the child when a monitor comes or
goes. States (``ScreenState``): off (disabled, or no DRM device: a dev PC),
no display connected, starting, showing, failed (retrying with backoff; a
problem with the setting and the fix is open meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.config.schema import DisplaySection
from appliance.retry import Backoff
from appliance.runtimes import Frame
from appliance.screen import connectors
from appliance.screen.buffer import FrameBuffer
from appliance.status.problems import ProblemOwner

__all__ = ["Screen", "ScreenState"]

log = logging.getLogger("appliance.screen")

POLL_S = 1.0  # sysfs connector poll
STALL_S = 10.0  # the child reports every second once ready; silent this long = hung
STARTUP_S = 90.0  # imports and SDL/GL start-up: seconds on a Pi, a minute and more under emulation
# A child still starting when its time is up gets twice as long next time, up to this: on an
# overloaded emulated CPU a restart every 90 s only started the slow part over, adding load
STARTUP_MAX_S = 960.0
HEALTHY_S = 10.0  # showing this long resets the backoff
NO_CONNECTOR = "No currently active connector found"  # SDL's KMSDRM words for "no monitor"


def emulated_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """QEMU's TCG emulator (not KVM: that shows the real CPU)."""
    try:
        return "QEMU TCG CPU" in cpuinfo.read_text(errors="replace")
    except OSError:
        return False


class ScreenState(enum.Enum):
    OFF = "off"
    NO_DISPLAY = "no display connected"
    STARTING = "starting"
    SHOWING = "showing"
    FAILED = "failed"


class Screen:
    """Shows every frame on the local screen through a supervised SDL child process."""

    def __init__(
        self,
        display: DisplaySection,
        problems: ProblemOwner,
        *,
        on_state: Callable[[], None] | None = None,
        driver: str | None = None,
        render_driver: str | None = None,
        sysfs: Path | None = connectors.DRM_SYSFS,
        dev_dri: Path = connectors.DEV_DRI,
        backoff: Backoff | None = None,
    ) -> None:
        self.display = display
        self._problems = problems
        self._on_state = on_state
        # a developer can watch it in a window: SDL_VIDEODRIVER=x11 appliance run --dev
        self.driver = driver or os.environ.get("SDL_VIDEODRIVER") or "kmsdrm"
        self.render_driver = render_driver if render_driver is not None else (
            os.environ.get("SDL_RENDER_DRIVER") or ("opengles2" if self.driver == "kmsdrm" else ""))
        self._startup_s = STARTUP_S  # grows on a device that starts the child slowly
        self._sysfs, self._dev_dri = sysfs, dev_dri
        self.buffer = FrameBuffer.create()
        self.backoff = backoff or Backoff(first_s=1.0, max_s=30.0, jitter=0.1, immediate=True)
        self.state, self.reason = ScreenState.STARTING, ""
        self.ready: dict[str, Any] = {}  # the child's "ready" line
        self.stats: dict[str, Any] = {}  # its latest "stats" line
        self.connector = ""
        self.restarts = 0
        self.pid: int | None = None
        self.frames_in = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Event()  # config changed: restart the child now
        self._last_stats = 0.0

    # -- the frame sink ----------------------------------------------------------------

    async def send_frame(self, frame: Frame) -> None:
        if self.display.enabled:
            self.buffer.write(frame.image)
            self.frames_in += 1

    # -- supervision -----------------------------------------------------------------

    def apply(self, display: DisplaySection) -> None:
        """A reload changed [display]: restart the child with it (or stop it)."""
        self.display = display
        self._changed.set()

    async def run(self) -> None:
        try:
            while True:
                self._changed.clear()
                seen = self._look()
                if not self.display.enabled:
                    self._set_state(ScreenState.OFF, "[display] enabled = false")
                elif self._needs_drm() and not seen[0]:
                    self._set_state(ScreenState.OFF, f"no DRM device ({self._dev_dri}/card*)")
                elif self._sysfs is not None and seen[1] and not connectors.connected(seen[1]):
                    self._set_state(ScreenState.NO_DISPLAY, "every connector is disconnected")
                else:
                    delay = await self._run_child(seen)
                    if delay is not None:
                        await self._wait_for_change(seen, delay)
                    continue
                await self._wait_for_change(seen, None)
        finally:
            await self._stop_child()

    async def close(self) -> None:
        await self._stop_child()
        self.buffer.close()

    def _needs_drm(self) -> bool:
        return self.driver == "kmsdrm"

    def _look(self) -> tuple[bool, dict[str, str]]:
        """What the child depends on: a DRM device, and the connectors' states."""
        has_drm = connectors.has_drm_device(self._dev_dri) if self._needs_drm() else True
        return has_drm, (connectors.scan(self._sysfs) if self._sysfs is not None else {})

    async def _wait_for_change(self, seen: tuple[bool, dict[str, str]], timeout: float | None) -> None:
        """Until the DRM devices or connectors change, the config changes, or ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            wait = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            if self._changed.is_set():
                return
            now_seen = self._look()
            if now_seen != seen:
                log.info("display connectors changed: %s → %s", _fmt(seen[1]), _fmt(now_seen[1]))
                return

    async def _run_child(self, seen: tuple[bool, dict[str, str]]) -> float | None:
        """Start the child and watch it; returns the delay before the next try (None: at once)."""
        self._set_state(ScreenState.STARTING, "")
        env = dict(os.environ, SDL_VIDEODRIVER=self.driver)
        if self.render_driver:
            env["SDL_RENDER_DRIVER"] = self.render_driver
        if emulated_cpu():
            # Mesa's llvmpipe emits AVX2 gathers that QEMU 7.2's TCG executes wrongly (the
            # child segfaulted): SSE4.1 code paths only, on an emulated CPU only
            env.setdefault("GALLIUM_OVERRIDE_CPU_CAPS", "sse4.1")
        fd = self.buffer.fd
        self._proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "appliance.screen.child", "--fd", str(fd),
            "--rotate", str(self.display.rotate), pass_fds=(fd,), env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
        self.pid, self.ready, self.stats, error = proc.pid, {}, {}, None
        self._last_stats = started = time.monotonic()
        reader = asyncio.create_task(self._read(proc))
        try:
            while True:
                done, _ = await asyncio.wait({reader}, timeout=POLL_S)
                if done:
                    error = reader.result()
                    break
                now = time.monotonic()
                if self._changed.is_set():
                    log.info("[display] settings changed: restarting the screen")
                    return None
                now_seen = self._look()
                if now_seen != seen:
                    log.info("display connectors changed: %s → %s: restarting the screen",
                             _fmt(seen[1]), _fmt(now_seen[1]))
                    return None
                limit = STALL_S if self.ready else self._startup_s
                if now - self._last_stats > limit:
                    error = f"the screen child stopped answering for {limit:.0f} s"
                    if not self.ready:
                        self._startup_s = min(STARTUP_MAX_S, 2 * self._startup_s)
                        error += f" while starting (the next start gets {self._startup_s:.0f} s)"
                    break
                if self.state is ScreenState.SHOWING and now - started > HEALTHY_S:
                    self.backoff.reset()
            if self.ready and self.state is ScreenState.SHOWING and error is None:
                error = f"the screen child exited ({await proc.wait()})"
        finally:
            reader.cancel()
            await self._stop_child()
        self.restarts += 1
        delay = self.backoff.next_delay()
        error = error or "the screen child exited"
        if NO_CONNECTOR in error:
            self._set_state(ScreenState.NO_DISPLAY, f"{error} (retry in {delay:.0f} s)")
        else:
            self._set_state(ScreenState.FAILED, f"{error} (retry in {delay:.0f} s)")
            self._problems.report(
                f"cannot show the avatar on the screen: {error}", subject="display",
                setting="[display] enabled",
                fix=("another program may hold the screen (a desktop session or a second kiosk "
                     "program: `fuser -v /dev/dri/card*`): stop it, or set [display] enabled = "
                     "false; the kiosk keeps serving the room and retries"))
        return delay

    async def _read(self, proc: asyncio.subprocess.Process) -> str | None:
        """The child's lines until it exits; returns its error, if it said one."""
        assert proc.stdout is not None
        error = None
        async for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                log.warning("screen child said: %s", raw.decode(errors="replace").rstrip())
                continue
            self._last_stats = time.monotonic()
            event = msg.get("event")
            if event == "ready":
                self.ready = msg
                names = connectors.connected(self._look()[1])
                self.connector = names[0] if names else msg.get("display", "")
                self._set_state(ScreenState.SHOWING, f"{msg.get('driver')} {msg.get('renderer')}")
            elif event == "stats":
                self.stats = msg
            elif event == "error":
                error = f"{msg.get('stage')}: {msg.get('error')}"
        code = await proc.wait()
        return error or (f"the screen child exited with code {code}" if not self.ready else None)

    async def _stop_child(self) -> None:
        proc, self._proc = self._proc, None
        self.pid = None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(2.0):
                await proc.wait()
        except TimeoutError:
            log.warning("screen child %d did not stop: SIGKILL", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def _set_state(self, state: ScreenState, reason: str) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        old, self.state, self.reason = self.state, state, reason
        if state in (ScreenState.SHOWING, ScreenState.OFF, ScreenState.NO_DISPLAY):
            self._problems.dismiss("display")  # states, not faults
        level = logging.WARNING if state in (ScreenState.FAILED, ScreenState.NO_DISPLAY) else logging.INFO
        log.log(level, "screen: %s → %s%s", old.value, state.value, f" ({reason})" if reason else "",
                extra={"reason": reason})
        if self._on_state is not None:
            self._on_state()

    # -- status ------------------------------------------------------------------------

    def summary(self) -> str:
        """One line for `appliance status`."""
        if self.state is ScreenState.SHOWING:
            fps = self.stats.get("fps")
            return (f"showing on {self.connector or '?'} {self.ready.get('mode')} "
                    f"({self.ready.get('driver')}, {self.ready.get('renderer')}), "
                    f"{fps if fps is not None else '?'} fps, rotate {self.display.rotate}")
        return f"{self.state.value}: {self.reason}" if self.reason else self.state.value

    def status(self) -> dict[str, Any]:
        showing = self.state is ScreenState.SHOWING
        return {
            "state": self.state.value,
            "reason": self.reason or None,
            "summary": self.summary(),
            "connector": self.connector or None,
            "mode": self.ready.get("mode") if showing else None,
            "driver": self.ready.get("driver") if showing else self.driver,
            "renderer": self.ready.get("renderer") if showing else None,
            "rotate": self.display.rotate,
            "fps": self.stats.get("fps", 0.0) if showing else 0.0,
            "latency_ms": self.stats.get("latency_ms") if showing else None,
            "frames_shown": self.stats.get("frames", 0) if showing else 0,
            "restarts": self.restarts,
            "pid": self.pid,
        }


def _fmt(states: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in states.items()) or "none"
