"""The kiosk's presence in the LiveKit room.

The stock ``AvatarRunner`` of LiveKit Agents publishes nothing until an agent
joins and caps video at 20 fps (it publishes without a VideoEncoding). A
kiosk shows a resting avatar 24/7, so this module publishes its own video and
audio tracks the moment it joins, at the runtime's full rate, kept in sync by
``rtc.AVSynchronizer``, and still speaks the LiveKit Agents avatar protocol
through ``DataStreamAudioReceiver`` (byte stream topic ``lk.audio_stream``,
RPCs ``lk.clear_buffer`` and ``lk.playback_finished``). Any agent that uses
``DataStreamAudioOutput(room, destination_identity=<kiosk identity>)`` drives
it unchanged.

It reconnects forever: the SDK resumes short outages itself; after it gives up
(about 30 s) it emits ``disconnected`` and a fresh ``rtc.Room`` is made, with
backoff. Frames keep coming from the renderer throughout and are dropped while
offline, so the renderer stays warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioReceiver

from appliance.auth import TokenError, TokenSource
from appliance.runtimes import AUDIO_SAMPLE_RATE, Frame, VideoSpec

__all__ = ["RoomState", "RoomOptions", "KioskRoom", "SpeechSink"]

log = logging.getLogger("appliance.room")

# Audio queued ahead of the wire, at most (the native AudioSource blocks the frame pump
# beyond it): what the voice lags the picture by. The stock AvatarRunner uses 100 ms too.
AUDIO_QUEUE_MS = 100
# What stays queued while nothing is said, and what a barge-in leaves (as silence): enough
# to ride out the frame pump's jitter. A gap on the wire would make every subscriber's
# jitter buffer, and with it the voice's delay, grow for good.
AUDIO_STEADY_S = 0.06


class RoomState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"  # the SDK is resuming by itself
    WAITING = "waiting"  # backoff before a fresh Room
    STOPPED = "stopped"


class SpeechSink(Protocol):
    """Where received speech goes (the renderer)."""

    def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> object: ...
    def flush(self) -> object: ...
    def interrupt(self) -> object: ...


@dataclass(frozen=True)
class RoomOptions:
    url: str
    room: str
    identity: str
    simulcast: bool = False
    max_bitrate_kbps: int = 1500
    connect_timeout_s: float = 10.0
    retry_max_s: float = 10.0


class _Playback:
    """Tracks one spoken reply, to tell the agent when and where playback ended."""

    def __init__(self) -> None:
        self.active = False  # a segment has started and not been reported yet
        self.position_s = 0.0
        self.started_reported = False

    def reset(self) -> None:
        self.active = False
        self.position_s = 0.0
        self.started_reported = False


class KioskRoom:
    """Joins the room as the kiosk, publishes A/V, receives speech, reconnects forever."""

    def __init__(
        self,
        options: RoomOptions,
        tokens: TokenSource,
        video: VideoSpec,
        speech: SpeechSink,
        on_state: Callable[[RoomState, str], None] | None = None,
    ) -> None:
        self.options = options
        self._tokens = tokens
        self._video = video
        self._speech = speech
        self._on_state = on_state
        self.state = RoomState.IDLE
        self.state_reason = ""
        self.retry_at: float | None = None  # monotonic time of the next attempt while WAITING
        self.connected_since: float | None = None
        self.frames_published = 0
        self.agent_identity: str | None = None  # the agent whose speech we receive
        self._room: rtc.Room | None = None
        self._av_sync: rtc.AVSynchronizer | None = None
        self._audio_source: rtc.AudioSource | None = None
        self._video_source: rtc.VideoSource | None = None
        self._receiver: DataStreamAudioReceiver | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._disconnected = asyncio.Event()
        self._stopping = False
        self._playback = _Playback()
        self._interrupts = 0  # barge-ins so far: a frame on its way when one came is not heard
        self._audio_lock = asyncio.Lock()  # one AudioSource.capture_frame at a time

    @property
    def speaking(self) -> bool:
        """A reply is being received or played (model swaps wait for this to end)."""
        return self._playback.active

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
        failures = 0
        while not self._stopping:
            try:
                await self._connect_once()
                failures = 0
                await self._disconnected.wait()
                reason = "the server closed the connection or the SDK gave up"
            except TokenError as exc:
                reason = str(exc)
            except rtc.ConnectError as exc:
                reason = _explain_connect_error(str(exc), self.options)
                self._tokens.invalidate()  # a refused or stale token: ask for a fresh one next time
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the SDK raises plain exceptions too; keep trying
                reason = f"{type(exc).__name__}: {exc}"
            await self._teardown()
            if self._stopping:
                break
            failures += 1
            delay = min(self.options.retry_max_s, 0.5 * 2 ** min(failures - 1, 10))
            delay *= random.uniform(0.8, 1.2)  # a fleet of kiosks must not reconnect in lockstep
            self.retry_at = time.monotonic() + delay
            if failures == 1:
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
        options = rtc.RoomOptions(auto_subscribe=True, connect_timeout=self.options.connect_timeout_s)
        await room.connect(self.options.url, token, options)
        await self._publish(room)
        self._start_receiver(room)
        self.connected_since = time.monotonic()
        self._set_state(RoomState.LIVE, f"room {self.options.room}")

    async def _publish(self, room: rtc.Room) -> None:
        video = self._video
        self._audio_source = rtc.AudioSource(AUDIO_SAMPLE_RATE, 1, queue_size_ms=AUDIO_QUEUE_MS)
        self._video_source = rtc.VideoSource(video.width, video.height)
        self._av_sync = rtc.AVSynchronizer(
            audio_source=self._audio_source,
            video_source=self._video_source,
            video_fps=video.fps,
            video_queue_size_ms=100,
        )
        audio_track = rtc.LocalAudioTrack.create_audio_track("avatar-audio", self._audio_source)
        video_track = rtc.LocalVideoTrack.create_video_track("avatar-video", self._video_source)
        await room.local_participant.publish_track(
            audio_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        # Without an explicit VideoEncoding the SDK's preset caps small video at 20 fps.
        encoding = rtc.VideoEncoding(
            max_framerate=video.fps, max_bitrate=self.options.max_bitrate_kbps * 1000
        )
        await room.local_participant.publish_track(
            video_track,
            rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_CAMERA,
                simulcast=self.options.simulcast,
                video_encoding=encoding,
            ),
        )

    def _on_disconnected(self, reason: object = None) -> None:
        log.info("room disconnected: %s", reason)
        self._disconnected.set()

    async def _teardown(self) -> None:
        self.connected_since = None
        self.agent_identity = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._receiver is not None:
            with contextlib.suppress(Exception):
                await self._receiver.aclose()
            self._receiver = None
        if self._playback.active:
            self._playback.reset()
            self._speech.interrupt()
        if self._av_sync is not None:
            await self._av_sync.aclose()
            self._av_sync = None
        for source in (self._audio_source, self._video_source):
            if source is not None:
                with contextlib.suppress(Exception):
                    await source.aclose()
        self._audio_source = self._video_source = None
        room, self._room = self._room, None
        if room is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(room.disconnect(), timeout=5)

    async def close(self) -> None:
        """Leave the room (bounded time)."""
        self._stopping = True
        self._disconnected.set()
        await self._teardown()

    # -- speech in ---------------------------------------------------------------

    def _start_receiver(self, room: rtc.Room) -> None:
        self._spawn(self._serve_agents(room))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_agents(self, room: rtc.Room) -> None:
        """Serve one agent at a time; when it leaves, wait for the next one.

        Conversation agents come and go (one per session), while the kiosk stays.
        A DataStreamAudioReceiver binds to one agent, so each agent gets a new one.
        """
        while True:
            receiver = DataStreamAudioReceiver(room)
            self._receiver = receiver
            # start() waits for an agent participant; streams it sends before the handler
            # is registered are lost, so registration happens as soon as one is present
            await receiver.start()
            agent = receiver._remote_participant  # set by start(); no public accessor
            self.agent_identity = agent.identity if agent else None
            receiver.on("clear_buffer", self._on_clear_buffer)
            log.info("agent %s present: speech receiver ready", self.agent_identity,
                     extra={"agent": self.agent_identity})
            left = asyncio.Event()

            def on_left(participant: rtc.RemoteParticipant, left: asyncio.Event = left) -> None:
                if participant.identity == self.agent_identity:
                    left.set()

            room.on("participant_disconnected", on_left)
            consume = asyncio.ensure_future(self._receive_speech(receiver))
            waiting = asyncio.ensure_future(left.wait())
            try:
                await asyncio.wait({consume, waiting}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                room.off("participant_disconnected", on_left)
                for task in (consume, waiting):
                    task.cancel()
                await asyncio.gather(consume, waiting, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await receiver.aclose()
                room.unregister_byte_stream_handler("lk.audio_stream")
                self._receiver = None
            log.info("agent %s left", self.agent_identity, extra={"agent": self.agent_identity})
            self.agent_identity = None
            if self._playback.active:
                self._playback.reset()
                self._speech.interrupt()

    async def _receive_speech(self, receiver: DataStreamAudioReceiver) -> None:
        async for item in receiver:
            if isinstance(item, AudioSegmentEnd):
                self._speech.flush()
                continue
            if not self._playback.active:
                self._playback.reset()
                self._playback.active = True
            pcm = np.frombuffer(item.data, dtype=np.int16)
            if item.num_channels > 1:
                pcm = pcm.reshape(-1, item.num_channels).mean(axis=1).astype(np.int16)
            self._speech.push_audio(pcm.tobytes(), item.sample_rate)

    def _on_clear_buffer(self) -> None:
        """Barge-in: silence now. The renderer drops the speech it has queued or already
        rendered; here the audio queued for the wire gives way to a little silence."""
        self._interrupts += 1
        self._speech.interrupt()
        unplayed = 0.0
        if self._audio_source is not None:
            unplayed = self._audio_source.queued_duration
            self._audio_source.clear_queue()
            self._spawn(self._capture_audio(np.zeros(int(AUDIO_STEADY_S * AUDIO_SAMPLE_RATE), np.int16)))
        if self._playback.active and self._receiver is not None:
            heard = max(0.0, self._playback.position_s - unplayed)
            log.info("interrupted by the agent after %.2f s", heard)
            self._receiver.notify_playback_finished(heard, interrupted=True)
        self._playback.reset()

    # -- frames out ----------------------------------------------------------------

    async def push_frame(self, frame: Frame) -> None:
        """Publish one frame and its audio; a no-op while not in the room."""
        av_sync = self._av_sync
        if av_sync is None or self.state not in (RoomState.LIVE, RoomState.RECONNECTING):
            return
        height, width = frame.image.shape[:2]
        video_frame = rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, frame.image.tobytes())
        interrupts = self._interrupts
        await av_sync.push(video_frame)  # waits while the synchronizer's video queue is full
        audio = frame.audio
        if frame.speaking and interrupts != self._interrupts:
            audio = np.zeros_like(audio)  # interrupted while this frame waited
        elif not frame.speaking:
            audio = self._steady(audio)
        await self._capture_audio(audio)
        self.frames_published += 1
        self._track_playback(frame)

    def _steady(self, silence: np.ndarray) -> np.ndarray:
        """Silence, more or less of it: idle frames bring the queued audio back to
        AUDIO_STEADY_S (speech is never stretched or cut for it)."""
        queued = self._audio_source.queued_duration if self._audio_source else AUDIO_STEADY_S
        frame_s = len(silence) / AUDIO_SAMPLE_RATE
        if queued > AUDIO_STEADY_S + frame_s:
            return silence[:0]
        if queued < AUDIO_STEADY_S - frame_s:
            return np.zeros(2 * len(silence), np.int16)
        return silence

    async def _capture_audio(self, pcm: np.ndarray) -> None:
        source = self._audio_source
        if source is None or not len(pcm):
            return
        async with self._audio_lock:  # the native source refuses a capture while one waits
            await source.capture_frame(rtc.AudioFrame(pcm.tobytes(), AUDIO_SAMPLE_RATE, 1, len(pcm)))

    def _track_playback(self, frame: Frame) -> None:
        playback, receiver = self._playback, self._receiver
        if not playback.active or receiver is None:
            return
        if frame.speaking:
            if not playback.started_reported:
                playback.started_reported = True
                receiver.notify_playback_started()
            playback.position_s += len(frame.audio) / AUDIO_SAMPLE_RATE
        if frame.end_of_speech:
            log.info("playback finished after %.2f s", playback.position_s)
            receiver.notify_playback_finished(playback.position_s, interrupted=False)
            playback.reset()


def _explain_connect_error(message: str, options: RoomOptions) -> str:
    """One operator line for a failed connect."""
    lowered = message.lower()
    if "401" in lowered or "unauthorized" in lowered or "invalid token" in lowered or "signature" in lowered:
        return (f"[livekit] api_key / api_secret_file: the server at {options.url} refused the token"
                f" ({message}) — check that the key and secret match the server's")
    if "403" in lowered or "permission" in lowered:
        return (f"[livekit] room: the server refused joining room {options.room!r} ({message})"
                " — check the token's grants or token_url")
    return (f"[livekit] url: cannot connect to {options.url} ({message})"
            " — check the network, the URL and that the server is running")
