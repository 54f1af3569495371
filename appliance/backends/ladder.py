"""Which backend serves the kiosk's avatar: the local renderer, else the rungs of
``[fallback] ladder`` in order, and back to local once it is healthy again (issue 13).

    local ──(no local frame for unhealthy_after_s, or the renderer failed)──► handing over
    handing over ──(a rung's worker published its first frame)──► remote
    remote ──(local healthy for recover_after_s, doubled each time it flaps; no reply playing)──► local
    remote ──(the worker left or died)──► handing over (the next rung, or the same again)

The local renderer keeps restarting behind the scenes (with its own backoff, warm) whatever
serves; its health is read from its own frames, not from what the fan-out shows. A network
outage is not a reason to hand over: the room is not live then, and the cloud unreachable
too. While no backend delivers, the fan-out's hold frames keep every track and the screen
alive. The ladder is also the room's speech sink: speech goes to whichever backend serves.

Rungs: ``gpu`` (the operator's bitHuman GPU container, ``gpu.py``) and ``cloud`` (bitHuman's
cloud, ``cloud.py``); ``local`` in the list is the renderer itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from livekit.protocol import room as room_proto

from appliance.auth import ROOM_ADMIN, WORKER_TTL_S, TokenError, tokens_for, worker_role
from appliance.backends.cloud import CloudRung, RungFailed
from appliance.backends.gpu import GpuRung
from appliance.backends.local import LocalBackend, hold_key
from appliance.backends.remote import RemoteSession
from appliance.config import Config
from appliance.media import FrameFanout
from appliance.renderer import State
from appliance.retry import Backoff
from appliance.room import KioskRoom, server_api
from appliance.runtimes import VideoSpec
from appliance.status.problems import ProblemOwner

__all__ = ["FIRST_FRAME_TIMEOUT_S", "Ladder"]

log = logging.getLogger("appliance.backends.ladder")

Rung = GpuRung | CloudRung  # launch(url, room, token) → id, end(id), name, worker_identity

CHECK_S = 0.25
FIRST_FRAME_TIMEOUT_S = 30.0  # a rung's worker joined and published its first picture
QUIET_WAIT_S = 60.0  # fail-back waits at most this long for the reply in flight to end
LOCAL_FRESH_S = 1.0  # a local frame this recent: the local runtime delivers
# Hysteresis: a local runtime that fails again within this long after taking the avatar back
# flaps; each time, it must be healthy twice as long before the next take-back (up to
# RECOVER_MAX_S), so viewers do not watch the avatar ping-pong between renderers
FLAP_WINDOW_S = 600.0
RECOVER_MAX_S = 3600.0


class Ladder:
    def __init__(self, config: Config, local: LocalBackend, fanout: FrameFanout, problems: ProblemOwner,
                 room: Callable[[], KioskRoom | None], on_state: Callable[[], None] = lambda: None) -> None:
        self.local, self._fanout, self._problems = local, fanout, problems
        self._room, self._on_state = room, on_state
        self._configure(config)
        self.state = "local"  # local | handing over | remote | taking back
        self.active = "local"
        self.since = time.monotonic()
        self.reason = ""
        self.history: deque[dict[str, Any]] = deque(maxlen=20)
        self.switches = 0  # hand-overs and take-backs since the start (history keeps the last 20)
        self.session: RemoteSession | None = None
        self._rung: Rung | None = None
        self._session_id = ""
        self._local_healthy_since: float | None = None
        self._quiet_wait_since: float | None = None
        self._taken_back_at: float | None = None
        self._retry_at = 0.0
        self._backoff = Backoff(first_s=5.0, max_s=60.0, jitter=0.2)

    def _configure(self, config: Config) -> None:
        self.settings, self._config = config.fallback, config
        self.recover_s = config.fallback.recover_after_s  # grows while the local runtime flaps
        fallback = config.fallback
        self.rungs: list[Rung] = []
        for name in fallback.ladder:  # the operator's order
            if name == "gpu":
                self.rungs.append(GpuRung(fallback.gpu_api_url, config.livekit.identity, fallback.gpu_avatar_image,
                                          config.secret("fallback.gpu_api_secret")))
            elif name == "cloud":
                self.rungs.append(CloudRung(fallback.cloud_api_url, fallback.cloud_avatar_id, fallback.cloud_model,
                                            config.secret("avatar.api_secret")))

    async def apply(self, config: Config) -> None:
        """New [fallback] settings (or credentials): a remote session ends, local serves."""
        if self.session is not None:
            await self._take_back(self._room(), forced=True)
        self._configure(config)
        self._problems.clear()

    # -- the room's speech sink: whichever backend serves -----------------------------------

    @property
    def _speech(self) -> RemoteSession | LocalBackend:
        return self.session if self.session is not None else self.local

    def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> object:
        return self._speech.push_audio(pcm16, sample_rate, last_chunk)

    def flush(self) -> object:
        return self._speech.flush()

    def interrupt(self) -> object:
        if self.session is not None:  # the local backend drops the sinks' queued audio itself
            self._fanout.drop_queued_audio()
        return self._speech.interrupt()

    # -- control ----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(CHECK_S)
                await self._step()
        finally:
            await self._end_session("the kiosk is stopping")

    def _local_delivers(self) -> bool:
        renderer = self.local.renderer
        last = renderer.last_frame_monotonic if renderer is not None else None
        return (renderer is not None and renderer.state is State.RUNNING and last is not None
                and time.monotonic() - last < LOCAL_FRESH_S)

    def _why_hand_over(self) -> str | None:
        renderer = self.local.renderer
        if renderer is None:
            return None
        if renderer.state is State.FAILED:
            return f"the local runtime failed ({renderer.state_reason})"
        if renderer.last_frame_monotonic is None:
            return None  # still loading (a bitHuman model takes ~20 s): not a failure
        silent = time.monotonic() - renderer.last_frame_monotonic
        if silent > self.settings.unhealthy_after_s:
            return f"no frame from the local runtime for {silent:.0f} s"
        return None

    async def _step(self) -> None:
        if not self.rungs and self.session is None:
            return  # [fallback] ladder = ["local"]: nothing to do (a reload may add rungs)
        now = time.monotonic()
        delivers = self._local_delivers()
        if delivers and self._local_healthy_since is None:
            self._local_healthy_since = now
        elif not delivers:
            self._local_healthy_since = None
        room = self._room()
        if self.session is None:
            why = self._why_hand_over()
            if why and room is not None and room.rtc_room is not None and now >= self._retry_at:
                await self._hand_over(room, why)
            return
        if self.session.gone.is_set():
            await self._lost(room, "the remote worker left the room")
        elif (self._local_healthy_since is not None
              and now - self._local_healthy_since >= self.recover_s):
            await self._take_back(room)

    def _set(self, state: str, active: str, reason: str) -> None:
        if active != self.active:
            self.history.append({"at": time.time(), "from": self.active, "to": active, "reason": reason})
            self.switches += 1
        self.state, self.active, self.reason, self.since = state, active, reason, time.monotonic()
        log.info("backend: %s (%s): %s", active, state, reason, extra={"backend": active, "reason": reason})
        self._on_state()

    async def _hand_over(self, room: KioskRoom, why: str) -> None:
        log.warning("the local runtime cannot serve (%s): handing the avatar over", why)
        if self._taken_back_at is not None:
            served = time.monotonic() - self._taken_back_at
            if served < FLAP_WINDOW_S:
                self.recover_s = min(RECOVER_MAX_S, 2 * self.recover_s)
                log.warning("the local runtime failed again %.0f s after taking the avatar back: the next "
                            "take-back waits until it has been healthy for %.0f s", served, self.recover_s)
            else:
                self.recover_s = self.settings.recover_after_s
            self._taken_back_at = None  # once per take-back, not per retry of this hand-over
        self._set("handing over", self.active, why)
        self._problems.clear()  # the last hand-over's; this one's stay while a lower rung serves
        room.abort_reply(why)  # a reply the local runtime was playing: cut where it was heard
        rtc_room = room.rtc_room
        for rung in self.rungs:
            if rtc_room is None:
                break
            session = RemoteSession(rtc_room, rung.worker_identity, self._video())
            await session.start()
            try:
                token = await tokens_for(self._config, worker_role(self._config.livekit.identity),
                                         identity=rung.worker_identity, ttl_s=WORKER_TTL_S).token()
                session_id = await rung.launch(self._config.livekit.url, self._config.livekit.room, token)
            except (RungFailed, TokenError) as exc:
                self._problems.report_error(exc, subject=rung.name)
                await session.close()
                continue
            try:
                await asyncio.wait_for(session.first_frame.wait(), FIRST_FRAME_TIMEOUT_S)
            except TimeoutError:
                self._problems.report(f"the {rung.name} worker sent no picture within {FIRST_FRAME_TIMEOUT_S:.0f} s",
                                      setting="[fallback] ladder", fix="see the journal; the next rung is tried",
                                      subject=rung.name)
                await rung.end(session_id)
                await session.close()
                continue
            self.session, self._rung, self._session_id = session, rung, session_id
            self._fanout.hold.use_model(f"remote|{rung.name}", keep=False)  # its loop, not on disk
            self._fanout.switch_to(session)
            self._backoff.reset()
            self._set("remote", rung.name, why)
            return
        delay = self._backoff.next_delay()
        self._retry_at = time.monotonic() + delay
        self._set("local", "local", f"{why}; no rung could serve, holding the picture; trying again in {delay:.0f} s")

    async def _lost(self, room: KioskRoom | None, why: str) -> None:
        log.warning("%s: the avatar is held until another backend serves", why)
        if room is not None:
            room.abort_reply(why)
        await self._end_session(why)
        self._set("local", "local", why)  # the next step hands over again, or local serves

    async def _take_back(self, room: KioskRoom | None, forced: bool = False) -> None:
        if room is not None and room.speaking and not forced:  # a reply in flight: wait for a quiet point
            if self._quiet_wait_since is None:
                self._quiet_wait_since = time.monotonic()
            if time.monotonic() - self._quiet_wait_since < QUIET_WAIT_S:
                return
            room.abort_reply("the local runtime takes the avatar back")
        self._quiet_wait_since = None
        renderer = self.local.renderer
        if renderer is None:
            return
        if room is not None and forced:
            room.abort_reply("the fallback settings changed")
        renderer.skip_backlog(keep=1)
        if self.local.spec is not None:
            self._fanout.hold.use_model(hold_key(self.local.spec))
        self._fanout.switch_to(renderer)  # from its next frame on: the same tracks
        await self._end_session("the local runtime is healthy again")
        self._problems.clear()  # local serves: the rungs skipped on the way down do not matter now
        self._taken_back_at = None if forced else time.monotonic()
        self._set("local", "local", "the fallback settings changed" if forced
                  else f"local healthy for {self.recover_s:.0f} s")

    async def _end_session(self, why: str) -> None:
        session, rung, session_id = self.session, self._rung, self._session_id
        self.session, self._rung, self._session_id = None, None, ""
        if session is None or rung is None:
            return
        renderer = self.local.renderer
        if self._fanout.source is session and renderer is not None:
            self._fanout.switch_to(renderer)  # a source that ended would stop the fan-out
        await rung.end(session_id)
        await session.close()
        await self._remove(session.identity)

    async def _remove(self, identity: str) -> None:
        """The worker out of the room now, whatever the rung's end call did."""
        room = self._room()
        rtc_room = room.rtc_room if room is not None else None
        if rtc_room is None or identity not in rtc_room.remote_participants:
            return
        try:
            admin = tokens_for(self._config, ROOM_ADMIN, identity=f"{self._config.livekit.identity}-ladder")
            await server_api.call(self._config.livekit.url, "RoomService/RemoveParticipant", admin,
                                  room_proto.RoomParticipantIdentity(room=self._config.livekit.room, identity=identity),
                                  room_proto.RemoveParticipantResponse())
            log.info("remote worker %s removed from the room", identity)
        except (server_api.ServerApiError, TokenError) as exc:
            log.warning("removing remote worker %s: %s", identity, exc)

    def _video(self) -> VideoSpec:
        avatar = self._config.avatar
        return self.local.video or VideoSpec(avatar.width, avatar.height, 25.0)

    def status(self) -> dict[str, Any]:
        return {"active": self.active, "state": self.state, "since_s": round(time.monotonic() - self.since, 1),
                "reason": self.reason or None, "ladder": list(self.settings.ladder),
                "recover_after_s": self.recover_s, "switches": self.switches,
                "session": self.session.status() if self.session else None,
                "history": list(self.history)}
