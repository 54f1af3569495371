"""The kiosk's presence in the LiveKit room: join, publish, serve agents, reconnect forever.

The stock ``AvatarRunner`` of LiveKit Agents publishes nothing until an agent
joins and caps video at 20 fps (it publishes without a VideoEncoding). A
kiosk shows a resting avatar 24/7, so it publishes its own tracks the moment
it joins (``publisher.py``), at the runtime's full rate, and still speaks the
LiveKit Agents avatar protocol (``agent.py``): any agent that uses
``DataStreamAudioOutput(room, destination_identity=<kiosk identity>)`` drives
it unchanged.

:class:`KioskRoom` is a frame sink: frames arrive whatever the network does and
are published while live, dropped otherwise, so the renderer stays warm. The
SDK resumes short outages itself; after it gives up (about 20-30 s) it emits
``disconnected`` and a fresh ``rtc.Room`` is made, with backoff.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from livekit import rtc

from appliance.auth import TokenError, TokenSource
from appliance.errors import OperatorError
from appliance.retry import Backoff
from appliance.room.agent import AgentLink, SpeechSink
from appliance.room.publisher import PublishOptions, TrackPublisher
from appliance.runtimes import Frame, VideoSpec
from appliance.status.problems import ProblemOwner
from appliance.tasks import TaskOwner

__all__ = ["RoomState", "RoomOptions", "KioskRoom"]

log = logging.getLogger("appliance.room")


class RoomState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"  # the SDK is resuming by itself
    WAITING = "waiting"  # backoff before a fresh Room
    STOPPED = "stopped"


@dataclass(frozen=True)
class RoomOptions:
    url: str
    room: str
    identity: str
    simulcast: bool = False
    max_bitrate_kbps: int = 1500
    connect_timeout_s: float = 10.0
    retry_max_s: float = 10.0


class KioskRoom:
    """Joins the room as the kiosk, publishes A/V, receives speech, reconnects forever."""

    def __init__(
        self,
        options: RoomOptions,
        tokens: TokenSource,
        video: VideoSpec,
        speech: SpeechSink,
        on_state: Callable[[RoomState, str], None] | None = None,
        problems: ProblemOwner | None = None,
    ) -> None:
        self.options = options
        self._tokens = tokens
        self._video = video
        self._speech = speech
        self._on_state = on_state
        self._problems = problems
        self.state = RoomState.IDLE
        self.state_reason = ""
        self.retry_at: float | None = None  # monotonic time of the next attempt while WAITING
        self.connected_since: float | None = None
        self._room: rtc.Room | None = None
        self._publisher: TrackPublisher | None = None
        self._agent: AgentLink | None = None
        self._frames_before = 0  # published over earlier connections
        self._tasks = TaskOwner("room", log)
        self._disconnected = asyncio.Event()
        self._stopping = False
        self._backoff = Backoff(first_s=0.5, max_s=options.retry_max_s, jitter=0.2)

    @property
    def speaking(self) -> bool:
        """A reply is being received or played (model swaps wait for this to end)."""
        return self._agent is not None and self._agent.speaking

    @property
    def agent_identity(self) -> str | None:
        return self._agent.agent_identity if self._agent else None

    @property
    def rtc_room(self) -> rtc.Room | None:
        """The connected room, while live (the fallback relay works in it)."""
        return self._room if self.state in (RoomState.LIVE, RoomState.RECONNECTING) else None

    def abort_reply(self, why: str) -> None:
        """The backend stopped mid-reply: the agent hears that its reply was cut."""
        if self._agent is not None:
            self._agent.abort_reply(why)

    @property
    def frames_published(self) -> int:
        """Frames published since this room object was made, over every connection."""
        return self._frames_before + (self._publisher.frames_published if self._publisher else 0)

    # -- state ---------------------------------------------------------------

    def _set_state(self, new: RoomState, reason: str) -> None:
        if new is self.state and reason == self.state_reason:
            return
        log.info("room %s → %s (%s)", self.state.value, new.value, reason,
                 extra={"state": new.value, "reason": reason, "room": self.options.room})
        self.state, self.state_reason = new, reason
        if self._on_state:
            self._on_state(new, reason)

    # -- the connection loop ---------------------------------------------------

    async def run(self) -> None:
        """Stay in the room until close(): connect, serve, and on loss reconnect with backoff."""
        while not self._stopping:
            problem: OperatorError | None = None
            try:
                await self._connect_once()
                self._backoff.reset()
                await self._disconnected.wait()
                reason = "the server closed the connection or the SDK gave up"
            except TokenError as exc:
                problem = exc
            except rtc.ConnectError as exc:
                problem = _explain_connect_error(str(exc), self.options)
                self._tokens.invalidate()  # a refused or stale token: ask for a fresh one next time
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the SDK raises plain exceptions too; keep trying
                problem = OperatorError(f"{type(exc).__name__}: {exc}", setting="[livekit] url",
                                        fix="see the journal; the kiosk keeps trying")
            if problem is not None:
                reason = problem.operator_line()
                if self._problems is not None:
                    self._problems.report_error(problem, subject=self.options.url)
            await self._teardown()
            if self._stopping:
                break
            delay = self._backoff.next_delay()
            self.retry_at = time.monotonic() + delay
            if self._backoff.failures == 1 and problem is None:
                log.warning("%s", reason, extra={"reason": reason})
            self._set_state(RoomState.WAITING, f"{reason}; retry in {delay:.0f} s")
            try:
                await asyncio.sleep(delay)
            finally:
                self.retry_at = None
        self._set_state(RoomState.STOPPED, "closed")

    async def _connect_once(self) -> None:
        self._set_state(RoomState.CONNECTING, self.options.url)
        self._disconnected.clear()
        token = await self._tokens.token()
        room = rtc.Room()
        self._room = room
        room.on("disconnected", self._on_disconnected)
        room.on("reconnecting", lambda: self._set_state(RoomState.RECONNECTING, "connection lost, resuming"))
        room.on("reconnected", lambda: self._set_state(RoomState.LIVE, f"room {self.options.room} (resumed)"))
        # the kiosk watches nobody: a remote worker's tracks are subscribed by its session; every
        # other track (the visitor's own microphone, other participants) would only cost downlink
        options = rtc.RoomOptions(auto_subscribe=False, connect_timeout=self.options.connect_timeout_s)
        await room.connect(self.options.url, token, options)
        publisher = TrackPublisher(self._video, PublishOptions(self.options.simulcast,
                                                               self.options.max_bitrate_kbps))
        self._publisher = publisher
        await publisher.publish(room)
        self._agent = AgentLink(room, self._speech, publisher)
        self._tasks.spawn(self._agent.run(), "agents")
        self.connected_since = time.monotonic()
        if self._problems is not None:
            self._problems.clear()  # joined: whatever kept us out is gone
        self._set_state(RoomState.LIVE, f"room {self.options.room}")

    def _on_disconnected(self, reason: object = None) -> None:
        log.info("room disconnected: %s", reason)
        self._disconnected.set()

    async def _teardown(self) -> None:
        self.connected_since = None
        await self._tasks.close()  # the agent link ends its reply, if one was playing
        self._agent = None
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            self._frames_before += publisher.frames_published
            await publisher.aclose()
        room, self._room = self._room, None
        if room is not None:
            try:
                await asyncio.wait_for(room.disconnect(), timeout=5)
            except Exception as exc:
                log.debug("disconnect: %r", exc)

    async def close(self) -> None:
        """Leave the room (bounded time)."""
        self._stopping = True
        self._disconnected.set()
        await self._teardown()

    # -- frames out ----------------------------------------------------------------

    async def send_frame(self, frame: Frame) -> None:
        """Publish one frame and its audio; a no-op while not in the room."""
        publisher, agent = self._publisher, self._agent
        if publisher is None or self.state not in (RoomState.LIVE, RoomState.RECONNECTING):
            return
        await publisher.send_frame(frame)
        if agent is not None:
            agent.track(frame)


def _explain_connect_error(message: str, options: RoomOptions) -> OperatorError:
    """What a failed connect means for the operator."""
    lowered = message.lower()
    if "401" in lowered or "unauthorized" in lowered or "invalid token" in lowered or "signature" in lowered:
        return OperatorError(f"the server at {options.url} refused the token ({message})",
                             setting="[livekit] api_key / api_secret_file",
                             fix="check that the key and secret match the server's")
    if "403" in lowered or "permission" in lowered:
        return OperatorError(f"the server refused joining room {options.room!r} ({message})",
                             setting="[livekit] room", fix="check the token's grants or token_url")
    return OperatorError(f"cannot connect to {options.url} ({message})", setting="[livekit] url",
                         fix="check the network, the URL and that the server is running")
