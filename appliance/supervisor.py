"""The supervisor: wires config, renderer and room together and keeps them alive.

    renderer child ──frames──► frame pump ──► KioskRoom (LiveKit tracks)
          ▲                                       │
          └────────── speech (push_audio/flush/interrupt) ◄── agent

The renderer is started first and kept warm whatever the network does: the
room may come and go, frames keep flowing and are simply not published while
offline. Status is gathered here for ``appliance status`` and systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.auth import FetchedTokens, MintedTokens, TokenError, TokenSource
from appliance.config import Config, ConfigError, effective_values, save_last_good
from appliance.config.watch import diff_configs
from appliance.devices import Devices
from appliance.devices.gpio import LedState
from appliance.models.manifest import UpdateError
from appliance.models.rollout import ModelUpdates
from appliance.models.store import ModelEntry
from appliance.renderer import Renderer, RendererOptions, RendererSpec
from appliance.room import KioskRoom, RoomOptions, RoomState
from appliance.runtimes import Frame, RuntimeFailure, VideoSpec
from appliance.status.logs import apply_levels
from appliance.status.server import HealthServer, StatusServer
from appliance.status.states import RendererState
from appliance.status.systemd import Notifier

__all__ = ["Supervisor", "bundled_model", "make_token_source"]

log = logging.getLogger("appliance.supervisor")

# settings that need a process restart (the others apply live)
RESTART_ONLY = {"avatar.width", "avatar.height", "status.socket", "status.http_port", "models.directory"}

# Feed systemd's watchdog only while a frame arrived within this window: the renderer's own
# restarts (stall_timeout_s + backoff) get this long to recover before systemd restarts us.
WATCHDOG_GRACE_S = 45.0


def bundled_model() -> str:
    """Path of the reference avatar shipped inside the package (the embedded default)."""
    return str(resources.files("appliance") / "data" / "reference-avatar.json")


def make_token_source(config: Config) -> TokenSource:
    lk = config.livekit
    if lk.token_url:
        return FetchedTokens(url=lk.token_url, room=lk.room, identity=lk.identity,
                             timeout_s=lk.connect_timeout_s)
    secret = config.secret("livekit.api_secret")
    if lk.api_key and lk.api_secret_file and secret is None:
        raise TokenError(
            f"[livekit] api_secret_file: the secret in {lk.api_secret_file} could not be read (see above);"
            " not joining — fix it, then `systemctl restart appliance`"
        )
    if not lk.api_key or secret is None:
        raise TokenError(
            "[livekit] api_key / api_secret_file / token_url: no way to get a join token"
            " — set api_key and api_secret_file, or token_url"
        )
    return MintedTokens(api_key=lk.api_key, api_secret=secret, room=lk.room,
                        identity=lk.identity, ttl_s=lk.token_ttl_s)


def renderer_spec(config: Config, entry: ModelEntry | None = None) -> RendererSpec:
    """What to render: the model store's current model when updates are on, else [avatar]."""
    avatar = config.avatar
    secret = config.secret("avatar.api_secret")
    return RendererSpec(
        runtime=entry.runtime if entry and entry.path else avatar.runtime,
        model=entry.path if entry and entry.path else (avatar.model or bundled_model()),
        width=avatar.width,
        height=avatar.height,
        api_secret=secret.reveal() if secret else None,
    )


# written at boot by appliance-boot-config.service when /boot/firmware/appliance.toml is refused
BOOT_CONFIG_PROBLEMS = Path("/run/appliance-boot-config/problems.txt")


def _boot_config_problems() -> list[str]:
    try:
        return [line for line in BOOT_CONFIG_PROBLEMS.read_text().splitlines() if line.strip()]
    except OSError:
        return []


class _FpsMeter:
    """Frames per second over a sliding window (monotonic clock)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        while self._times and now - self._times[0] > self._window_s:
            self._times.popleft()

    def fps(self, now: float) -> float:
        while self._times and now - self._times[0] > self._window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(now - self._times[0], 1e-6)


class Supervisor:
    """Owns the renderer and the room; applies config reloads; reports status."""

    def __init__(
        self,
        config: Config,
        *,
        load: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._load = load  # re-reads the config layers on reload
        self.notifier = notifier or Notifier()
        self.ready = False
        self.started_at = time.monotonic()
        self.renderer: Renderer | None = None
        self.spec: RendererSpec | None = None  # what self.renderer renders
        self._generation = 1  # renderers are named #1, #2... as models are swapped in
        self.room: KioskRoom | None = None
        self.updates: ModelUpdates | None = None
        self.devices: Devices | None = None  # speaker, GPIO sensors and LED (optional hardware)
        self.last_motion: float | None = None  # monotonic time of the last motion/button event
        self._updates_task: asyncio.Task[None] | None = None
        self._room_task: asyncio.Task[None] | None = None
        self.last_frame_at: float | None = None
        self.fps_meter = _FpsMeter()
        # operator-facing reasons, each owned by what produces it: a model swap clears the
        # renderer's, never the room's
        self.renderer_problem = ""  # why the model cannot render
        self.room_problem = ""  # why the kiosk is not joining the room
        self.config_problems: list[str] = []  # why the last reload was refused
        self.last_reload: str = ""
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Warm the renderer (first frames flowing), then join the room in the background."""
        if not self.config_problems:
            save_last_good(self.config)
        await self._open_devices(self.config)
        entry = self._start_updates(self.config)
        self.spec = renderer_spec(self.config, entry)
        self.renderer = await self._start_renderer(self.spec, self.config)
        self._tasks.append(asyncio.create_task(self._pump_frames(), name="frame-pump"))
        self._start_room(self.config)

    async def _open_devices(self, config: Config) -> None:
        # PortAudio probing can take a second: not on the event loop
        # the microphone is not published yet (see config.notes): do not capture for nothing
        audio = dataclasses.replace(config.audio, microphone="")
        self.devices = await asyncio.to_thread(
            Devices.open, audio, config.gpio, asyncio.get_running_loop(),
            on_motion=self._on_presence, on_button=self._on_presence,
        )
        for line in self.devices.problems:
            log.error("%s", line, extra={"reason": line})
        self.devices.set_led(LedState.BLINK)

    async def _close_devices(self) -> None:
        devices, self.devices = self.devices, None
        if devices is not None:
            await asyncio.to_thread(devices.close)

    def _on_presence(self, active: bool) -> None:
        """A visitor moved or pressed the button: recorded and shown in status."""
        if active:
            self.last_motion = time.monotonic()
            log.info("visitor presence (motion sensor or button)")

    def _start_updates(self, config: Config) -> ModelEntry | None:
        """Model updates, when [models] manifest_url is set; returns the store's current model."""
        if not config.models.manifest_url:
            return None
        try:
            self.updates = ModelUpdates(config, swap=self._swap_to_entry, is_idle=self.is_idle,
                                        healthy=self.healthy)
        except (UpdateError, ValueError, OSError) as exc:
            line = exc.operator_line() if isinstance(exc, UpdateError) else str(exc)
            log.error("[models]: updates disabled: %s", line, extra={"reason": line})
            return None
        current = self.updates.current()

        async def run(updates: ModelUpdates) -> None:
            await updates.startup_trial()
            await updates.run()

        self._updates_task = asyncio.create_task(run(self.updates), name="model-updates")
        return current

    async def _stop_updates(self) -> None:
        task, self._updates_task, self.updates = self._updates_task, None, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _start_renderer(self, spec: RendererSpec, config: Config) -> Renderer:
        renderer = Renderer(
            spec,
            RendererOptions(stall_timeout_s=config.avatar.stall_timeout_s),
            name="#1",
            on_state=lambda old, new, reason: self._status_changed(),
        )
        try:
            await renderer.start()
            self.renderer_problem = ""
        except RuntimeFailure as exc:
            # a bad model or credential: keep the process up, say why, let the renderer retry
            self.renderer_problem = exc.operator_line()
            log.error("%s", self.renderer_problem,
                      extra={"reason": self.renderer_problem, "model": spec.model})
        return renderer

    def _start_room(self, config: Config) -> None:
        try:
            tokens = make_token_source(config)
        except TokenError as exc:
            self.room_problem = str(exc)
            log.error("%s", self.room_problem, extra={"reason": self.room_problem})
            return
        self.room_problem = ""
        lk, avatar = config.livekit, config.avatar
        assert self.renderer is not None
        self.room = KioskRoom(
            RoomOptions(
                url=lk.url, room=lk.room, identity=lk.identity, simulcast=lk.simulcast,
                max_bitrate_kbps=lk.max_bitrate_kbps, connect_timeout_s=lk.connect_timeout_s,
                retry_max_s=lk.retry_max_s,
            ),
            tokens,
            # before the first successful start the renderer cannot tell; the config can
            self.renderer.video or VideoSpec(avatar.width, avatar.height, 25.0),
            self,
            on_state=lambda state, reason: self._status_changed(),
        )
        self._room_task = asyncio.create_task(self.room.run(), name="room")

    async def _stop_room(self) -> None:
        room, task = self.room, self._room_task
        self.room, self._room_task = None, None
        if room is not None:
            await room.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def run(self) -> None:
        status = StatusServer(self.config.status.socket, self.status)
        try:
            await status.start()
        except OSError as exc:
            log.warning("[status] socket: cannot listen on %s (%s) — `appliance status` will not work",
                        self.config.status.socket, exc)
        health = None
        if self.config.status.http_port:
            health = HealthServer(self.config.status.http_port, self.status)
            try:
                await health.start()
            except OSError as exc:
                log.warning("[status] http_port: cannot listen on 127.0.0.1:%d (%s)",
                            self.config.status.http_port, exc)
                health = None
        await self.start()
        self._tasks.append(asyncio.create_task(self._report_loop(), name="report"))
        await self._stop.wait()
        self.notifier.stopping()
        await status.close()
        if health is not None:
            await health.close()
        await self.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        """Leave the room, stop the renderer; bounded by the callers' timeout."""
        await self._stop_updates()
        await self._stop_room()
        if self.devices is not None:
            self.devices.set_led(LedState.OFF)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.renderer is not None:
            await self.renderer.close()
        await self._close_devices()

    async def _report_loop(self) -> None:
        """READY once frames flow; STATUS= as things change; WATCHDOG=1 only while frames advance."""
        interval = min(1.0, self.notifier.watchdog_interval_s or 1.0)
        while True:
            renderer = self.renderer
            failed = renderer is not None and renderer.state is RendererState.FAILED
            flowing = self.frames_flowing(WATCHDOG_GRACE_S)
            if not self.ready and (self.frames_flowing(1.0) or failed):
                # a model that cannot open is diagnosed, not hung: be "active" and say why,
                # rather than have systemd restart us in a loop that cannot help
                self.ready = True
                self.notifier.ready(self.status_line())
                log.info("ready: %s", self.status_line())
            else:
                self.notifier.status(self.status_line())
            if self.ready and (flowing or failed):
                self.notifier.watchdog_ping()
            await asyncio.sleep(interval)

    # -- reload ----------------------------------------------------------------

    async def reload(self, trigger: str) -> bool:
        """Parse and validate everything first; apply only what changed; never half-apply.

        Returns False (and keeps the last good config running) when the new one is invalid.
        """
        if self._load is None:
            return False
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = self._load()
            except ConfigError as exc:
                self.config_problems = [str(p) for p in exc.problems]
                for line in self.config_problems:
                    log.error("config not applied (%s): %s", trigger, line, extra={"reason": line})
                log.error("keeping the last good configuration")
                return False
            finally:
                self.notifier.ready(self.status_line())
            self.config_problems = []
            changed = diff_configs(self.config, new)
            if self.updates is not None:
                self.updates.check_now()  # `appliance models update --now` / rollback signal us
            if not changed:
                log.info("config reloaded (%s): no change", trigger)
                await self._apply(new, [])  # the model store may have switched (rollback)
                return True
            log.info("config reloaded (%s): %s changed", trigger, ", ".join(changed))
            await self._apply(new, changed)
            save_last_good(new)
            self.last_reload = f"{', '.join(changed)} ({trigger})"
            return True

    async def _apply(self, new: Config, changed: list[str]) -> None:
        self.config = new
        restart_only = [key for key in changed if key in RESTART_ONLY]
        if restart_only:
            log.warning("%s: takes effect at the next restart (`systemctl restart appliance`)",
                        ", ".join(restart_only))
        if any(key.startswith("logging.") for key in changed):
            apply_levels(new.logging.level, new.logging.sdk_level)
        if changed == ["audio.speaker_volume"] and self.devices is not None:
            self.devices.set_volume(new.audio.speaker_volume)
        elif any(key.startswith(("audio.", "gpio.")) for key in changed):
            await self._close_devices()
            await self._open_devices(new)
        if any(key.startswith("models.") for key in changed):
            await self._stop_updates()
            self._start_updates(new)
        if "avatar.stall_timeout_s" in changed and self.renderer is not None:
            self.renderer.options = dataclasses.replace(self.renderer.options,
                                                        stall_timeout_s=new.avatar.stall_timeout_s)
        wanted = renderer_spec(new, self.updates.current() if self.updates else None)
        if wanted != self.spec:
            reason = await self._warm_and_switch(wanted, new.models.warmup_timeout_s)
            if reason is not None:
                log.error("new model not used: %s; the current one keeps serving", reason,
                          extra={"reason": reason, "model": wanted.model})
        if any(key.startswith(("livekit.", "secret livekit")) for key in changed):
            log.info("rejoining: LiveKit settings changed", extra={"room": new.livekit.room})
            await self._stop_room()
            self._start_room(new)

    async def _swap_to_entry(self, entry: ModelEntry | None, deadline_s: float) -> str | None:
        return await self._warm_and_switch(renderer_spec(self.config, entry), deadline_s)

    async def _warm_and_switch(self, spec: RendererSpec, deadline_s: float) -> str | None:
        """Warm ``spec`` in a second renderer while the current one keeps publishing; switch
        on a frame boundary once it renders healthily. Returns why it failed, or None."""
        log.info("warming %s model %s beside the current one", spec.runtime, spec.model,
                 extra={"model": spec.model, "backend": spec.runtime})
        self._generation += 1
        fresh = Renderer(spec, RendererOptions(stall_timeout_s=self.config.avatar.stall_timeout_s),
                         name=f"#{self._generation}",
                         on_state=lambda old, new, reason: self._status_changed())
        if self.renderer is not None:
            fresh.adopt_spare(self.renderer)
        deadline = time.monotonic() + deadline_s
        reason: str | None = None
        try:
            await asyncio.wait_for(fresh.start(), timeout=deadline_s)
            # healthy = frames at (nearly) the full rate for a second, not just one frame
            while fresh.fps < 0.8 * (fresh.video.fps if fresh.video else 25.0) or fresh.state is not RendererState.RUNNING:
                if time.monotonic() > deadline:
                    reason = f"rendered {fresh.fps:.1f} fps, not a healthy rate, within {deadline_s:.0f} s"
                    break
                await asyncio.sleep(0.2)
        except RuntimeFailure as exc:
            reason = exc.operator_line()
        except TimeoutError:
            reason = f"no frame within {deadline_s:.0f} s"
        if reason is not None:
            await fresh.close()
            return reason
        fresh.skip_backlog(keep=2)  # two frames absorb the phase offset between the two clocks
        old, self.renderer, self.spec = self.renderer, fresh, spec  # the pump switches at its next frame
        self.renderer_problem = ""
        log.info("now rendering %s", spec.model, extra={"model": spec.model, "backend": spec.runtime})
        if old is not None:
            old.interrupt()
            await old.close()
        return None

    def is_idle(self) -> bool:
        return self.room is None or not self.room.speaking

    def healthy(self) -> bool:
        renderer = self.renderer
        return renderer is not None and renderer.state is RendererState.RUNNING and self.frames_flowing(1.0)

    # -- speech (the room's SpeechSink): always the current renderer ------------------

    def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> object:
        return self.renderer.push_audio(pcm16, sample_rate, last_chunk) if self.renderer else False

    def flush(self) -> object:
        return self.renderer.flush() if self.renderer else False

    def interrupt(self) -> object:
        if self.devices is not None and self.devices.speaker is not None:
            self.devices.speaker.clear()  # barge-in: the local speaker stops too
        return self.renderer.interrupt() if self.renderer else False

    # -- frames --------------------------------------------------------------------

    async def _pump_frames(self) -> None:
        while True:
            renderer = self.renderer
            assert renderer is not None
            async for frame in renderer.frames():
                await self._publish(frame)  # the last old frame too: no frame is thrown away
                if renderer is not self.renderer:
                    break  # swapped: continue with the new renderer's frames
            else:
                if renderer is self.renderer:
                    return  # closed

    async def _publish(self, frame: Frame) -> None:
        now = time.monotonic()
        self.last_frame_at = now
        self.fps_meter.tick(now)
        if self.devices is not None and self.devices.speaker is not None:
            self.devices.speaker.play(frame.audio)  # the same slice the room gets
        if self.room is not None:
            await self.room.push_frame(frame)

    def frames_flowing(self, within_s: float = 1.0) -> bool:
        return self.last_frame_at is not None and time.monotonic() - self.last_frame_at < within_s

    # -- status ------------------------------------------------------------------------

    def _status_changed(self) -> None:
        if self.devices is not None:
            live = (self.room is not None and self.room.state is RoomState.LIVE
                    and self.renderer is not None and self.renderer.state is RendererState.RUNNING)
            self.devices.set_led(LedState.ON if live else LedState.BLINK)
        if self.ready:
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """One human line for systemd's STATUS= and `appliance status`."""
        now = time.monotonic()
        runtime = self.config.avatar.runtime
        if self.renderer is None or not self.frames_flowing(2.0):
            state = self.renderer.state.value if self.renderer else "starting"
            return f"renderer {state}" + (f": {self.renderer_problem}" if self.renderer_problem else "")
        fps = f"{self.fps_meter.fps(now):.1f} fps"
        updates = self.updates.updater if self.updates else None
        if updates is not None and updates.progress.total and updates.state.value == "downloading":
            share = 100 * updates.progress.done / updates.progress.total
            fps += f" · downloading model {updates.progress.version} ({share:.0f}%)"
        room = self.room
        if room is None:
            return f"rendering · {runtime} · {fps} · not joining: {self.room_problem}"
        if room.state is RoomState.LIVE:
            return f"live in room {room.options.room} · {runtime} · {fps}"
        if room.state is RoomState.WAITING and room.retry_at is not None:
            wait = max(0.0, room.retry_at - now)
            return f"waiting for network (retry in {wait:.0f} s) · {runtime} warm · {fps}"
        return f"{room.state.value} · {runtime} warm · {fps}"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        renderer, room = self.renderer, self.room
        return {
            "status": self.status_line(),
            "uptime_s": round(now - self.started_at, 1),
            "runtime": self.config.avatar.runtime,
            "model": self.spec.model if self.spec else None,
            "models": self.updates.status() if self.updates else None,
            "pid": os.getpid(),
            "fps_10s": round(self.fps_meter.fps(now), 2),
            "renderer": {
                "state": renderer.state.value if renderer else None,
                "pid": renderer.pid if renderer else None,
                "restarts": renderer.restarts if renderer else 0,
                "last_restart_reason": renderer.last_restart_reason if renderer else None,
            },
            "room": {
                "name": self.config.livekit.room,
                "url": self.config.livekit.url,
                "identity": self.config.livekit.identity,
                "state": room.state.value if room else None,
                "reason": room.state_reason if room else None,
                "frames_published": room.frames_published if room else 0,
            },
            "agent": room.agent_identity if room else None,
            "devices": self.devices.status() if self.devices else None,
            "last_presence_ago_s": round(now - self.last_motion, 1) if self.last_motion else None,
            "problem": "; ".join(p for p in (self.renderer_problem, self.room_problem) if p) or None,
            "config_problems": self.config_problems,
            "boot_config_problems": _boot_config_problems(),
            "config": effective_values(self.config),
            "last_reload": self.last_reload or None,
        }
