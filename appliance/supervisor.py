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
import logging
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

from appliance.config import Config
from appliance.renderer import Renderer, RendererSpec
from appliance.room import KioskRoom, RoomOptions, RoomState
from appliance.runtime import RuntimeFailure, VideoSpec
from appliance.status import StatusServer
from appliance.tokens import FetchedTokens, MintedTokens, TokenError, TokenSource

__all__ = ["Supervisor", "bundled_model", "make_token_source"]

log = logging.getLogger("appliance.supervisor")


def bundled_model() -> str:
    """Path of the reference avatar shipped inside the package (the embedded default)."""
    return str(resources.files("appliance") / "data" / "reference-avatar.json")


def make_token_source(config: Config) -> TokenSource:
    lk = config.livekit
    if lk.token_url:
        return FetchedTokens(url=lk.token_url, room=lk.room, identity=lk.identity,
                             timeout_s=lk.connect_timeout_s)
    secret = config.secret("livekit.api_secret")
    if not lk.api_key or secret is None:
        raise TokenError(
            "[livekit] api_key / api_secret_file / token_url: no way to get a join token"
            " — set api_key and api_secret_file, or token_url"
        )
    return MintedTokens(api_key=lk.api_key, api_secret=secret, room=lk.room,
                        identity=lk.identity, ttl_s=lk.token_ttl_s)


def renderer_spec(config: Config) -> RendererSpec:
    avatar = config.avatar
    secret = config.secret("avatar.api_secret")
    return RendererSpec(
        runtime=avatar.runtime,
        model=avatar.model or bundled_model(),
        width=avatar.width,
        height=avatar.height,
        api_secret=secret.reveal() if secret else None,
    )


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
    def __init__(
        self,
        config: Config,
        *,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._on_status = on_status
        self.started_at = time.monotonic()
        self.renderer: Renderer | None = None
        self.room: KioskRoom | None = None
        self.last_frame_at: float | None = None
        self.fps_meter = _FpsMeter()
        self.problem: str = ""  # the operator-facing reason we cannot serve, if any
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Warm the renderer (first frames flowing), then join the room in the background."""
        self.renderer = Renderer(
            renderer_spec(self.config),
            stall_timeout_s=self.config.avatar.stall_timeout_s,
            name="main",
            on_state=lambda old, new, reason: self._status_changed(),
        )
        try:
            await self.renderer.start()
        except RuntimeFailure as exc:
            # a bad model or credential: keep the process up, say why, let the renderer retry
            self.problem = exc.operator_line()
            log.error("%s", self.problem, extra={"reason": self.problem})
        self._tasks.append(asyncio.create_task(self._pump_frames(), name="frame-pump"))
        try:
            tokens = make_token_source(self.config)
        except TokenError as exc:
            self.problem = str(exc)
            log.error("%s", self.problem, extra={"reason": self.problem})
            return
        lk = self.config.livekit
        self.room = KioskRoom(
            RoomOptions(
                url=lk.url, room=lk.room, identity=lk.identity, simulcast=lk.simulcast,
                max_bitrate_kbps=lk.max_bitrate_kbps, connect_timeout_s=lk.connect_timeout_s,
                retry_max_s=lk.retry_max_s,
            ),
            tokens,
            # before the first successful start the renderer cannot tell; the config can
            self.renderer.video or VideoSpec(self.config.avatar.width, self.config.avatar.height, 25.0),
            self.renderer,
            on_state=lambda state, reason: self._status_changed(),
        )
        self._tasks.append(asyncio.create_task(self.room.run(), name="room"))

    async def run(self) -> None:
        status = StatusServer(self.config.status.socket, self.status)
        try:
            await status.start()
        except OSError as exc:
            log.warning("[status] socket: cannot listen on %s (%s) — `appliance status` will not work",
                        self.config.status.socket, exc)
        await self.start()
        await self._stop.wait()
        await status.close()
        await self.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        """Leave the room, stop the renderer; bounded by the callers' timeout."""
        if self.room is not None:
            await self.room.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.renderer is not None:
            await self.renderer.close()

    # -- frames --------------------------------------------------------------------

    async def _pump_frames(self) -> None:
        assert self.renderer is not None
        async for frame in self.renderer.frames():
            now = time.monotonic()
            self.last_frame_at = now
            self.fps_meter.tick(now)
            if self.room is not None:
                await self.room.push_frame(frame)

    def frames_flowing(self, within_s: float = 1.0) -> bool:
        return self.last_frame_at is not None and time.monotonic() - self.last_frame_at < within_s

    # -- status ------------------------------------------------------------------------

    def _status_changed(self) -> None:
        if self._on_status:
            self._on_status(self.status_line())

    def status_line(self) -> str:
        """One human line for systemd's STATUS= and `appliance status`."""
        now = time.monotonic()
        runtime = self.config.avatar.runtime
        if self.renderer is None or not self.frames_flowing(2.0):
            state = self.renderer.state.value if self.renderer else "starting"
            return f"renderer {state}" + (f": {self.problem}" if self.problem else "")
        fps = f"{self.fps_meter.fps(now):.1f} fps"
        room = self.room
        if room is None:
            return f"rendering · {runtime} · {fps} · not joining: {self.problem}"
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
            "model": renderer_spec(self.config).model,
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
            "problem": self.problem or None,
        }
