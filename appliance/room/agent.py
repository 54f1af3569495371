"""The LiveKit Agents avatar protocol, kiosk side: speech in, playback events out.

One conversation agent at a time sends its speech as a byte stream on
``lk.audio_stream`` (``DataStreamAudioReceiver`` reads it: audio frames, then
``AudioSegmentEnd``), interrupts with the ``lk.clear_buffer`` RPC, and learns
from ``lk.playback_started`` / ``lk.playback_finished`` when and where a reply
was heard. Agents come and go (one per session) while the kiosk stays: when an
agent leaves, a new receiver waits for the next one.

The agent served is a *conversation* agent: a participant of kind agent that is
not itself somebody's avatar (those carry ``lk.publish_on_behalf``). When a newer
one joins, the kiosk serves it instead (the old one is on its way out). The
kiosk names the agent it serves in its own ``lk.publish_on_behalf``, so front
ends show it as that agent's avatar, and takes speech from that agent only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioReceiver

from appliance.auth import NO_AGENT_YET, PUBLISH_ON_BEHALF
from appliance.room.publisher import TrackPublisher
from appliance.runtimes import AUDIO_SAMPLE_RATE, Frame
from appliance.tasks import stop_tasks

__all__ = ["AgentLink", "SpeechSink", "conversation_agents"]

log = logging.getLogger("appliance.room")

ATTRIBUTE_TIMEOUT_S = 5.0


def conversation_agents(room: rtc.Room) -> list[rtc.RemoteParticipant]:
    """Agent-kind participants that are nobody's avatar, in the order they joined."""
    return [p for p in room.remote_participants.values()
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            and PUBLISH_ON_BEHALF not in p.attributes]


class SpeechSink(Protocol):
    """Where received speech goes (the active backend)."""

    def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> object: ...
    def flush(self) -> object: ...
    def interrupt(self) -> object: ...


class _Playback:
    """One spoken reply, to tell the agent when and where playback ended."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.active = False  # a segment has started and not been reported yet
        self.position_s = 0.0
        self.started_reported = False


class AgentLink:
    """Serves one agent after another in ``room``; ``run()`` until cancelled."""

    def __init__(self, room: rtc.Room, speech: SpeechSink, publisher: TrackPublisher) -> None:
        self._room, self._speech, self._publisher = room, speech, publisher
        self._receiver: DataStreamAudioReceiver | None = None
        self._playback = _Playback()
        self.agent_identity: str | None = None  # the agent whose speech we receive
        # (agent, position) of a reply whose receiver failed mid-way: the next receiver for
        # that agent reports it cut, or the agent's turn would never end
        self._owed_finish: tuple[str, float] | None = None

    @property
    def speaking(self) -> bool:
        """A reply is being received or played (model swaps wait for this to end)."""
        return self._playback.active

    async def run(self) -> None:
        try:
            while True:
                await self._serve_one()
        finally:
            self.end_reply()

    async def _serve_one(self) -> None:
        room = self._room
        agent = await self._next_agent()
        self.agent_identity = agent.identity
        receiver = DataStreamAudioReceiver(room, sender_identity=agent.identity)
        self._receiver = receiver
        # streams sent before the handler is registered are lost: register before saying
        # (in the attribute) whose avatar the kiosk is
        await receiver.start()
        receiver.on("clear_buffer", self._on_clear_buffer)
        await self._serve_on_behalf_of(agent.identity)
        log.info("agent %s present: speech receiver ready", agent.identity, extra={"agent": agent.identity})
        owed, self._owed_finish = self._owed_finish, None
        if owed is not None and owed[0] == agent.identity:
            log.info("telling agent %s its reply was cut after %.2f s (the last receiver failed)", *owed)
            receiver.notify_playback_finished(owed[1], interrupted=True)
        done = asyncio.Event()

        def on_left(participant: rtc.RemoteParticipant) -> None:
            if participant.identity == agent.identity:
                done.set()

        def on_joined(participant: rtc.RemoteParticipant) -> None:
            if participant in conversation_agents(room):
                log.info("agent %s joined: serving it instead of %s", participant.identity, agent.identity)
                done.set()

        room.on("participant_disconnected", on_left)
        room.on("participant_connected", on_joined)
        consume = asyncio.create_task(self._receive_speech(receiver), name="room:speech")
        waiting = asyncio.create_task(done.wait(), name="room:agent-changed")
        try:
            await asyncio.wait({consume, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if consume.done() and not consume.cancelled() and consume.exception():
                log.error("speech receiver failed: %r", consume.exception(),
                          exc_info=consume.exception())
                if self._playback.active:
                    self._owed_finish = (agent.identity, self._playback.position_s)
        finally:
            room.off("participant_disconnected", on_left)
            room.off("participant_connected", on_joined)
            await stop_tasks(consume, waiting)
            try:
                await receiver.aclose()
            except Exception as exc:
                log.debug("closing the speech receiver: %r", exc)
            room.unregister_byte_stream_handler("lk.audio_stream")
            self._receiver = None
        log.info("agent %s no longer served", agent.identity, extra={"agent": agent.identity})
        self.agent_identity = None
        self.end_reply()
        if not conversation_agents(room):
            await self._serve_on_behalf_of(NO_AGENT_YET)

    async def _next_agent(self) -> rtc.RemoteParticipant:
        """The newest conversation agent in the room, once there is one."""
        joined = asyncio.Event()

        def on_change(*_: object) -> None:
            joined.set()

        self._room.on("participant_connected", on_change)
        try:
            while not (agents := conversation_agents(self._room)):
                joined.clear()
                await joined.wait()
            return agents[-1]
        finally:
            self._room.off("participant_connected", on_change)

    async def _serve_on_behalf_of(self, identity: str) -> None:
        """Say in the kiosk's own attributes whose avatar it is now."""
        local = self._room.local_participant
        if local.attributes.get(PUBLISH_ON_BEHALF) == identity:
            return
        try:
            await asyncio.wait_for(local.set_attributes({PUBLISH_ON_BEHALF: identity}), ATTRIBUTE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # speech still flows; front ends just do not pair us with it
            log.warning("cannot set %s=%s on the kiosk (%s): [livekit] token_url must answer kind=agent "
                        "with canUpdateOwnMetadata; speech still plays", PUBLISH_ON_BEHALF, identity, exc)

    def abort_reply(self, why: str) -> None:
        """The backend playing the reply stopped serving mid-reply: tell the agent it was cut
        where the viewers last heard it (its turn would never end otherwise)."""
        playback, receiver = self._playback, self._receiver
        if playback.active and receiver is not None:
            log.info("reply cut after %.2f s: %s", playback.position_s, why)
            receiver.notify_playback_finished(playback.position_s, interrupted=True)
        playback.reset()

    def end_reply(self) -> None:
        """The agent or the room went away mid-reply: the rest of it is not played."""
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
        """Barge-in: silence now. The backend drops the speech it has queued or already
        rendered; the publisher drops the voice queued for the wire."""
        self._speech.interrupt()
        unplayed = self._publisher.clear()
        if self._playback.active and self._receiver is not None:
            heard = max(0.0, self._playback.position_s - unplayed)
            log.info("interrupted by the agent after %.2f s", heard)
            self._receiver.notify_playback_finished(heard, interrupted=True)
        self._playback.reset()

    def track(self, frame: Frame) -> None:
        """A frame was published: report playback started / finished to the agent."""
        playback, receiver = self._playback, self._receiver
        if not playback.active or receiver is None:
            return
        if frame.speaking:
            if not playback.started_reported:
                playback.started_reported = True
                receiver.notify_playback_started()
            playback.position_s += len(frame.audio) / AUDIO_SAMPLE_RATE
        if frame.end_of_speech:
            # a relayed reply's position is what the remote worker played
            position = float(frame.meta.get("played_s", playback.position_s))
            log.info("playback finished after %.2f s", position)
            receiver.notify_playback_finished(position, interrupted=False)
            playback.reset()
