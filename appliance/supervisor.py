"""The supervisor: wires the parts together, applies reloads, owns their tasks.

    backend (local renderer) ──frames──► FrameFanout ──┬─► KioskRoom (LiveKit tracks)
          ▲                                            ├─► AudioLink ─► audio child (speaker, mic +
          │                                            │    echo canceller, the visitor participant)
          │                                            └─► Screen (shared memory → SDL child)
          └──────── speech (push_audio/flush/interrupt) ◄── agent, through the room

The backend is started first and kept warm whatever the network does: the room
may come and go, frames keep flowing and are simply not published while
offline. Problems are records in one registry, each owned by the part that
detects it; status is gathered by ``status/snapshot.py``, systemd is told by
``status/systemd.py``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from appliance.auth import ROOM_ADMIN, VISITOR, TokenError, tokens_for
from appliance.backends.hold import HoldLoop, hold_cache_dir
from appliance.backends.ladder import Ladder
from appliance.backends.local import LocalBackend
from appliance.config import Config, ConfigError, Problem, restart_only_keys, save_last_good
from appliance.config.boot import refused_import
from appliance.config.watch import diff_configs
from appliance.devices import Devices
from appliance.devices.audio_link import AudioLink, AudioSettings
from appliance.devices.gpio import LedState
from appliance.media import FpsMeter, FrameFanout
from appliance.models.manifest import UpdateError
from appliance.models.rollout import ModelUpdates
from appliance.models.store import ModelEntry
from appliance.presence import Presence
from appliance.renderer import Renderer, RendererSpec
from appliance.room import KioskRoom, RoomOptions, RoomState
from appliance.room.dispatch import Conversation
from appliance.runtimes import VideoSpec
from appliance.screen.screen import Screen
from appliance.speak import SpeakError, decode_wav, speak
from appliance.status.control import ControlServer, control_socket_for
from appliance.status.logs import apply_levels
from appliance.status.problems import Problems
from appliance.status.server import HealthServer, StatusServer
from appliance.status.snapshot import Parts, snapshot, status_line
from appliance.status.systemd import Notifier, Reporter
from appliance.tasks import TaskOwner

__all__ = ["Supervisor", "bundled_model", "renderer_spec"]

log = logging.getLogger("appliance.supervisor")

# Feed systemd's watchdog only while a frame arrived within this window: the renderer's own
# restarts (stall_timeout_s + backoff) get this long to recover before systemd restarts us.
WATCHDOG_GRACE_S = 45.0


# A shutdown slower than this logs the tasks it is waiting for (systemd kills at TimeoutStopSec)
STOP_REPORT_S = 5.0


_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)


def _waiting_in(root: asyncio.Future[Any]) -> list[str]:
    """Every task still running, with the innermost line outside asyncio it awaits at."""
    found = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        coro: Any = task.get_coro()
        where = "?"
        while coro is not None:  # down the await chain to where it is suspended
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None and not frame.f_code.co_filename.startswith(_ASYNCIO_DIR):
                where = f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        found.append(f"{'shutdown' if task is root else task.get_name()} at {where}")
    return sorted(found)


def bundled_model() -> str:
    """Path of the reference avatar shipped inside the package (the embedded default)."""
    return str(resources.files("appliance") / "data" / "reference-avatar.json")


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


class Supervisor:
    """Owns the parts (backend, fan-out, room, devices, updates); applies config reloads."""

    def __init__(
        self,
        config: Config,
        *,
        load: Callable[[], Config] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._load = load  # re-reads the config layers on reload
        self.started_at = time.monotonic()
        self.problems = Problems(on_change=self._status_changed)
        self.fanout = FrameFanout(hold=HoldLoop(hold_cache_dir()))
        self.backend = LocalBackend(self.fanout, self.problems.owner("renderer"),
                                    stall_timeout_s=config.avatar.stall_timeout_s,
                                    on_state=self._status_changed)
        self.room: KioskRoom | None = None
        # the fallback ladder: which backend serves, and the room's speech sink
        self.ladder = Ladder(config, self.backend, self.fanout, self.problems.owner("backend"),
                             room=lambda: self.room, on_state=self._status_changed)
        self.updates: ModelUpdates | None = None
        self.devices: Devices | None = None  # GPIO sensors and LED (optional hardware)
        self.audio: AudioLink | None = None  # the audio child: speaker, microphone, visitor
        self._audio_task: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self.screen: Screen | None = None  # the local display (its own supervised child)
        self.last_presence: float | None = None  # monotonic time of the last motion/button event
        self.presence = Presence(end_after_absent_s=config.agent.end_after_absent_s,
                                 max_session_s=config.agent.max_session_s, on_visit=self._on_visit)
        self.conversation: Conversation | None = None  # presence → agent dispatch, with the room
        self._conversation_task: asyncio.Task[None] | None = None
        self.last_reload = ""
        self.reporter = Reporter(notifier or Notifier(), flowing=self.frames_flowing,
                                 failed=self.backend.failed, line=self.status_line,
                                 watchdog_grace_s=WATCHDOG_GRACE_S)
        self._tasks = TaskOwner("supervisor", log)
        self._updates_task: asyncio.Task[None] | None = None
        self._room_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    # -- what other parts and the tests read -------------------------------------------

    @property
    def notifier(self) -> Notifier:
        return self.reporter.notifier

    @property
    def renderer(self) -> Renderer | None:
        return self.backend.renderer

    @property
    def spec(self) -> RendererSpec | None:
        return self.backend.spec

    @property
    def fps_meter(self) -> FpsMeter:
        return self.fanout.meter

    @property
    def config_problems(self) -> list[str]:
        """Why the configuration files are not (all) in effect, as operator lines."""
        return [p.line() for p in self.problems.list("config")]

    def report_config_problems(self, problems: Sequence[Problem], *, logged: bool = False) -> None:
        """The config files have these problems (none: they are all in effect)."""
        self.problems.owner("config").replace((p.report() for p in problems), logged=logged)

    def frames_flowing(self, within_s: float = 1.0) -> bool:
        return self.fanout.flowing(within_s)

    def is_idle(self) -> bool:
        return self.room is None or not self.room.speaking

    def healthy(self) -> bool:
        return self.backend.healthy()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Warm the backend (first frames flowing), then join the room in the background."""
        if not self.config_problems:
            save_last_good(self.config)
        self.problems.owner("boot-config").replace(refused_import())
        self._tasks.spawn(self.fanout.run(), "frame fan-out")
        await self._open_devices(self.config)
        self._start_audio(self.config)
        entry = self._start_updates(self.config)
        await self.backend.start(renderer_spec(self.config, entry))
        # after the renderer is warm: nothing to show before, and without a GPU (llvmpipe)
        # the screen's start-up would compete with the renderer's
        self._start_screen(self.config)
        self._start_room(self.config)
        self._tasks.spawn(self.ladder.run(), "fallback ladder")

    async def run(self) -> None:
        servers = await self._start_status_servers()
        await self.start()
        self._tasks.spawn(self.reporter.run(), "systemd report")
        await self._stop.wait()
        self.notifier.stopping()
        started = time.monotonic()
        stopping = asyncio.ensure_future(self._shut_down(servers))
        # a shutdown that hangs (seen once in CI, not reproduced) must say where it waits
        while not (await asyncio.wait({stopping}, timeout=STOP_REPORT_S))[0]:
            log.warning("still stopping after %.0f s, waiting in: %s", time.monotonic() - started,
                        "; ".join(_waiting_in(stopping)))
        await stopping
        log.info("stopped in %.1f s", time.monotonic() - started)

    async def _shut_down(self, servers: Sequence[StatusServer | HealthServer | ControlServer]) -> None:
        for server in servers:
            await server.close()
        await self.close()

    async def _start_status_servers(self) -> list[StatusServer | HealthServer | ControlServer]:
        """`appliance status` on its socket and, if asked for, /healthz and /metrics: a
        kiosk that cannot serve its status still serves the avatar."""
        status = self.config.status
        control = control_socket_for(status.socket)
        wanted: list[tuple[StatusServer | HealthServer | ControlServer, str]] = [(
            StatusServer(status.socket, self.status),
            f"[status] socket: cannot listen on {status.socket} — `appliance status` will not work",
        ), (
            ControlServer(control, {"presence": self._presence_command, "speak": self._speak_command}),
            f"[status] socket: cannot listen on {control} — `appliance presence` and `appliance say` "
            "will not work",
        )]
        if status.http_port:
            wanted.append((HealthServer(status.http_port, self.status),
                           f"[status] http_port: cannot listen on 127.0.0.1:{status.http_port}"))
        started = []
        for server, failure in wanted:
            try:
                await server.start()
                started.append(server)
            except OSError as exc:
                log.warning("%s (%s)", failure, exc)
        return started

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self, trigger: str) -> None:
        """From a signal handler or the config watcher: reload in the background."""
        self._tasks.spawn(self.reload(trigger), f"reload ({trigger})")

    async def close(self) -> None:
        """Leave the room, stop the backend; bounded by the callers' timeout."""
        await self._stop_updates()
        await self._stop_room()
        await self._stop_audio()
        if self.devices is not None:
            self.devices.set_led(LedState.OFF)
        await self.backend.close()  # its frames end, and with them the fan-out
        self.presence.close()
        await self._tasks.close()
        await self._close_devices()
        if self.screen is not None:
            self.fanout.remove_sink(self.screen)
            await self.screen.close()

    # -- parts -------------------------------------------------------------------

    async def _open_devices(self, config: Config) -> None:
        # the speaker and microphone belong to the audio child (audio_link.py): only GPIO here
        audio = dataclasses.replace(config.audio, speaker="", microphone="")
        devices = await asyncio.to_thread(
            Devices.open, audio, config.gpio, asyncio.get_running_loop(),
            on_motion=self._on_motion, on_button=self._on_button,
        )
        self.devices = devices
        self.problems.owner("devices").replace(
            (e.setting, e.operator_line(), e.setting, e.fix) for e in devices.errors)
        self.fanout.add_sink(devices)
        self._status_changed()

    async def _close_devices(self) -> None:
        devices, self.devices = self.devices, None
        if devices is not None:
            self.fanout.remove_sink(devices)
            await asyncio.to_thread(devices.close)

    def _start_screen(self, config: Config) -> None:
        """The local display: a sink for every frame, its child supervised in the background."""
        self.screen = Screen(config.display, self.problems.owner("display"),
                             on_state=self._status_changed)
        self.fanout.add_sink(self.screen)
        self._tasks.spawn(self.screen.run(), "screen")

    def _on_motion(self, active: bool) -> None:
        self.presence.motion(active)
        self._on_presence(active)

    def _on_button(self, pressed: bool) -> None:
        self.presence.button(pressed)
        self._on_presence(pressed)

    def _presence_command(self, request: dict[str, Any]) -> dict[str, Any]:
        """`appliance presence arrive|leave` (root, over the control socket)."""
        action = request.get("action")
        if action == "arrive":
            self.presence.arrive("appliance presence")
            self._on_presence(True)
        elif action == "leave":
            self.presence.leave("appliance presence")
        else:
            return {"ok": False, "error": f"presence: unknown action {action!r} (arrive or leave)"}
        return {"ok": True, "presence": self.presence.status()}

    def _speak_command(self, request: dict[str, Any]) -> dict[str, Any]:
        """`appliance say FILE.wav|--stop` (root, over the control socket)."""
        if self.room is not None and self.room.speaking:
            return {"ok": False, "error": "appliance say: the conversation agent is speaking; "
                                          "try again when its reply has ended"}
        if request.get("stop"):
            self.ladder.interrupt()
            return {"ok": True, "stopped": True}
        try:
            pcm, rate = decode_wav(base64.b64decode(str(request.get("wav", "")), validate=True))
        except (SpeakError, binascii.Error) as exc:
            return {"ok": False, "error": f"appliance say: {exc}"}
        if not speak(self.ladder, pcm, rate):
            return {"ok": False, "error": "appliance say: the renderer is not running "
                                          "(see `appliance status`)"}
        return {"ok": True, "seconds": round(len(pcm) / rate, 2)}

    def _on_visit(self, started: bool, why: str) -> None:
        if self.conversation is not None:
            self.conversation.visit(started)
        self._status_changed()

    def _on_presence(self, active: bool) -> None:
        """A sign of a visitor: recorded, shown in status, and with [audio] mic_when =
        "presence" the microphone is live until presence_hold_s after it."""
        if active:
            self.last_presence = time.monotonic()
            log.info("visitor presence (motion sensor, button or `appliance presence`)")
            if self.audio is not None and self.config.audio.mic_when == "presence":
                self.audio.set_presence(True)
                if self._presence_task is not None:
                    self._presence_task.cancel()
                self._presence_task = self._tasks.spawn(self._presence_ends(), "presence hold")

    async def _presence_ends(self) -> None:
        await asyncio.sleep(self.config.audio.presence_hold_s)
        if self.audio is not None:
            log.info("no visitor for %.0f s: microphone muted", self.config.audio.presence_hold_s)
            self.audio.set_presence(False)

    def _start_audio(self, config: Config) -> None:
        """The audio child: the speaker (replacing the in-process one), the microphone with
        echo cancellation and the visitor participant. Without a way to get tokens it still
        plays the speaker; the visitor then stays out (the room's problem says why)."""
        try:
            tokens = tokens_for(config, VISITOR, identity=config.visitor_identity)
        except TokenError:
            tokens = None
        lk, audio = config.livekit, config.audio
        self.audio = AudioLink(
            AudioSettings(
                speaker=audio.speaker, microphone=audio.microphone, volume=audio.speaker_volume,
                echo_cancellation=audio.echo_cancellation, noise_suppression=audio.noise_suppression,
                mic_when=audio.mic_when, url=lk.url, room=lk.room, identity=config.visitor_identity,
                connect_timeout_s=lk.connect_timeout_s, retry_max_s=lk.retry_max_s),
            tokens, self.problems.owner("audio"))
        self.fanout.add_sink(self.audio)
        self._audio_task = self._tasks.spawn(self.audio.run(), "audio child")

    async def _stop_audio(self) -> None:
        audio, task = self.audio, self._audio_task
        self.audio, self._audio_task = None, None
        if audio is not None:
            self.fanout.remove_sink(audio)
            await audio.close()
        await self._tasks.stop(task)

    def _start_updates(self, config: Config) -> ModelEntry | None:
        """Model updates, when [models] manifest_url is set; returns the store's current model."""
        owner = self.problems.owner("updates")
        if not config.models.manifest_url:
            owner.clear()
            return None
        try:
            self.updates = ModelUpdates(config, swap=self._swap_to_entry, is_idle=self.is_idle,
                                        healthy=self.healthy, problems=owner)
        except (UpdateError, ValueError, OSError) as exc:
            if isinstance(exc, UpdateError):
                owner.report_error(exc)
            else:
                owner.report(f"updates disabled: {exc}", setting="[models]",
                             fix="check [models] manifest_url, public_key and directory")
            return None
        current = self.updates.current()

        async def run(updates: ModelUpdates) -> None:
            await updates.startup_trial()
            await updates.run()

        self._updates_task = self._tasks.spawn(run(self.updates), "model updates")
        return current

    async def _stop_updates(self) -> None:
        task, self._updates_task, self.updates = self._updates_task, None, None
        await self._tasks.stop(task)

    def _start_room(self, config: Config) -> None:
        problems = self.problems.owner("room")
        try:
            tokens = tokens_for(config)
        except TokenError as exc:
            problems.report_error(exc)
            return
        problems.clear()
        lk, avatar = config.livekit, config.avatar
        self.room = KioskRoom(
            RoomOptions(
                url=lk.url, room=lk.room, identity=lk.identity, simulcast=lk.simulcast,
                max_bitrate_kbps=lk.max_bitrate_kbps, connect_timeout_s=lk.connect_timeout_s,
                retry_max_s=lk.retry_max_s,
            ),
            tokens,
            # before the first successful start the renderer cannot tell; the config can
            self.backend.video or VideoSpec(avatar.width, avatar.height, 25.0),
            self.ladder,  # speech goes to whichever backend serves
            on_state=lambda state, reason: self._status_changed(),
            problems=problems,
        )
        self.fanout.add_sink(self.room)
        self._room_task = self._tasks.spawn(self.room.run(), "room")
        self._start_conversation(config)

    def _start_conversation(self, config: Config) -> None:
        owner = self.problems.owner("agent")
        owner.clear()
        try:
            admin = tokens_for(config, ROOM_ADMIN)
        except TokenError:
            admin = None  # the room's own problem says why: no conversation without a room
        room = self.room
        self.conversation = Conversation(
            config.agent, url=config.livekit.url, room=config.livekit.room, avatar=config.livekit.identity,
            visitor=config.visitor_identity, tokens=admin, problems=owner,
            served_agent=lambda: room.agent_identity if room is not None else None,
            on_change=self._status_changed)
        if self.presence.present:
            self.conversation.visit(True)
        if admin is not None:
            self._conversation_task = self._tasks.spawn(self.conversation.run(), "conversation")

    async def _stop_conversation(self) -> None:
        task, self._conversation_task = self._conversation_task, None
        await self._tasks.stop(task)  # deletes its dispatch on the way out
        self.conversation = None

    async def _stop_room(self) -> None:
        await self._stop_conversation()
        room, task = self.room, self._room_task
        self.room, self._room_task = None, None
        if room is not None:
            self.fanout.remove_sink(room)
            await room.close()
        await self._tasks.stop(task)

    # -- reload ----------------------------------------------------------------

    async def reload(self, trigger: str) -> bool:
        """Parse and validate everything first; apply only what changed; never half-apply.

        Returns False (and keeps the last good config running) when the new one is invalid.
        """
        if self._load is None:
            return False
        async with self._reload_lock:
            self.notifier.reloading()
            self.problems.owner("boot-config").replace(refused_import())
            try:
                new = self._load()
            except ConfigError as exc:
                for problem in exc.problems:  # every refused save says why, not just the first
                    log.error("config not applied (%s): %s", trigger, problem, extra={"reason": str(problem)})
                log.error("keeping the last good configuration")
                self.report_config_problems(exc.problems, logged=True)
                return False
            finally:
                self.notifier.ready(self.status_line())
            self.report_config_problems([])
            changed = diff_configs(self.config, new)
            if self.updates is not None:
                self.updates.check_now()  # `appliance models update --now` / rollback signal us
            if not changed:
                log.info("config reloaded (%s): no change", trigger)
                await self._apply(new, [])  # the model store may have switched (rollback)
                return True
            log.info("config reloaded (%s): %s changed", trigger, ", ".join(changed))
            # said before applying: status shows the new config from the first await in _apply on
            self.last_reload = f"{', '.join(changed)} ({trigger})"
            await self._apply(new, changed)
            save_last_good(new)
            return True

    async def _apply(self, new: Config, changed: list[str]) -> None:
        self.config = new
        restart_only = sorted(set(changed) & restart_only_keys())
        if restart_only:
            log.warning("%s: takes effect at the next restart (`systemctl restart appliance`)",
                        ", ".join(restart_only))
        if any(key.startswith("logging.") for key in changed):
            apply_levels(new.logging.level, new.logging.sdk_level)
        if changed == ["audio.speaker_volume"] and self.audio is not None:
            self.audio.set_volume(new.audio.speaker_volume)
        elif any(key.startswith(("audio.", "visitor.", "livekit.", "secret livekit")) for key in changed):
            await self._stop_audio()  # the child reopens its devices and rejoins as the visitor
            self._start_audio(new)
        if any(key.startswith("gpio.") for key in changed):
            await self._close_devices()
            await self._open_devices(new)
        if any(key.startswith("display.") for key in changed) and self.screen is not None:
            self.screen.apply(new.display)
        if any(key.startswith("models.") for key in changed):
            await self._stop_updates()
            self._start_updates(new)
        if "avatar.stall_timeout_s" in changed:
            self.backend.set_stall_timeout(new.avatar.stall_timeout_s)
        wanted = renderer_spec(new, self.updates.current() if self.updates else None)
        if wanted != self.spec:
            reason = await self.backend.switch_to(wanted, new.models.warmup_timeout_s)
            if reason is not None:
                self.problems.owner("renderer").report(
                    f"new model not used: {reason}; the current one keeps serving",
                    subject=wanted.model, setting="[avatar] model",
                    fix="fix the model or point [avatar] model back at a working one")
        if any(key.startswith(("fallback.", "secret avatar", "secret livekit", "livekit.")) for key in changed):
            await self.ladder.apply(new)
        if any(key.startswith("agent.") for key in changed):
            self.presence.set_limits(end_after_absent_s=new.agent.end_after_absent_s,
                                     max_session_s=new.agent.max_session_s)
        if any(key.startswith(("livekit.", "secret livekit")) for key in changed):
            log.info("rejoining: LiveKit settings changed", extra={"room": new.livekit.room})
            await self._stop_room()
            self._start_room(new)
        elif any(key.startswith(("agent.", "visitor.")) for key in changed) and self.room is not None:
            await self._stop_conversation()
            self._start_conversation(new)

    async def _swap_to_entry(self, entry: ModelEntry | None, deadline_s: float) -> str | None:
        return await self.backend.switch_to(renderer_spec(self.config, entry), deadline_s)

    # -- status ------------------------------------------------------------------------

    def _status_changed(self) -> None:
        if self.devices is not None:
            room_live = self.room is not None and self.room.state is RoomState.LIVE
            self.devices.show_state(live=room_live and self.backend.running())
        self.reporter.changed()

    def _parts(self) -> Parts:
        return Parts(self.config, self.started_at, self.backend, self.fanout, self.room,
                     self.updates, self.devices, self.problems, self.last_presence, self.last_reload,
                     self.audio, self.screen, self.presence, self.conversation, self.ladder)

    def status_line(self) -> str:
        return status_line(self._parts())

    def status(self) -> dict[str, Any]:
        return snapshot(self._parts())
