"""The bundled example conversation agent: a real LiveKit Agents worker that needs no cloud.

    LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=... \\
        python -m appliance.dev.example_agent start

It registers over ``/agent`` with ``agent_name`` "kiosk-greeter" (``EXAMPLE_AGENT_NAME``
overrides it), so only explicit dispatch brings it: the kiosk's ``[agent] name`` and a visitor.
Each job runs an ``AgentSession`` the way any agent would: it links to the kiosk's visitor
participant (named in the job metadata as ``kiosk_visitor``), sends its voice to the kiosk's
avatar (``kiosk_avatar``) with the avatar protocol (``DataStreamAudioOutput``), greets the
visitor, and answers whenever it hears them. The point is the loop, not the intelligence:
small local implementations of the STT/LLM/TTS interfaces stand in for real services
(`HeardSTT` "hears" speech the VAD cuts, `ReplyLLM` answers with a fixed sentence, `SpokenTTS`
speaks with espeak-ng, or the bundled WAV without it). `appliance run --dev` starts it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import subprocess
import wave

import numpy as np
from livekit import rtc
from livekit.agents import (
    Agent,
    AgentSession,
    APIConnectOptions,
    JobContext,
    JobProcess,
    WorkerOptions,
    cli,
    llm,
    room_io,
    stt,
    tts,
    utils,
)
from livekit.agents.language import LanguageCode
from livekit.agents.voice.avatar import DataStreamAudioOutput

from appliance.auth import PUBLISH_ON_BEHALF
from appliance.dev.demo import read_wav
from appliance.runtimes.reference import resample_linear

__all__ = ["AGENT_NAME", "GREETING", "REPLY", "HeardSTT", "ReplyLLM", "SpokenTTS", "main"]

log = logging.getLogger("appliance.dev.example_agent")

AGENT_NAME = "kiosk-greeter"
GREETING = "Hello, and welcome! I am the avatar of this kiosk."
REPLY = "I heard you. I am only an example agent: connect a real one to have a conversation."
CONNECT = APIConnectOptions()


class HeardSTT(stt.STT):
    """Non-streaming STT: each utterance the VAD cuts is 'recognised' and kept."""

    def __init__(self) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))
        self.utterances: list[np.ndarray] = []  # int16 mono, at the rate heard
        self.rate = 0

    async def _recognize_impl(self, buffer: utils.AudioBuffer, *, language: object = None,
                              conn_options: APIConnectOptions | None = None) -> stt.SpeechEvent:
        frame = rtc.combine_audio_frames(buffer)
        pcm = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)[:, 0]
        self.utterances.append(pcm.copy())
        self.rate = frame.sample_rate
        return stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT,
                               alternatives=[stt.SpeechData(language=LanguageCode("en"), text="hello there")])


class _ReplyStream(llm.LLMStream):
    async def _run(self) -> None:
        text = self._llm.reply  # type: ignore[attr-defined]
        self._event_ch.send_nowait(llm.ChatChunk(id="reply", delta=llm.ChoiceDelta(role="assistant", content=text)))


class ReplyLLM(llm.LLM):
    """Answers every turn with the same sentence."""

    def __init__(self, reply: str = REPLY) -> None:
        super().__init__()
        self.reply = reply

    def chat(self, *, chat_ctx: llm.ChatContext, tools: list | None = None,  # type: ignore[override]
             conn_options: APIConnectOptions = CONNECT, **_: object) -> llm.LLMStream:
        return _ReplyStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


def espeak(text: str) -> tuple[np.ndarray, int] | None:
    """``text`` spoken by espeak-ng (int16 mono and its rate), or None without it."""
    if shutil.which("espeak-ng") is None:
        return None
    done = subprocess.run(["espeak-ng", "--stdout", "-s", "160", text], capture_output=True, timeout=30)
    if done.returncode != 0:
        return None
    with wave.open(io.BytesIO(done.stdout)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), np.int16), wav.getframerate()


class _SpokenStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        pcm = await asyncio.to_thread(self._tts.speak, self.input_text)  # type: ignore[attr-defined]
        rate = self._tts.sample_rate
        output_emitter.initialize(request_id="spoken", sample_rate=rate, num_channels=1, mime_type="audio/pcm")
        for start in range(0, len(pcm), rate // 10):
            output_emitter.push(pcm[start:start + rate // 10].tobytes())
        output_emitter.flush()


class SpokenTTS(tts.TTS):
    """espeak-ng's voice; without espeak-ng (or with ``wav_repeat``), the bundled sentence
    ``wav_repeat`` times over (a reply long enough to talk over)."""

    def __init__(self, wav_repeat: int = 0) -> None:
        self._wav, rate = read_wav()
        self._wav_repeat = wav_repeat or (0 if shutil.which("espeak-ng") else 1)
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False),
                         sample_rate=rate if self._wav_repeat else 22050, num_channels=1)

    def speak(self, text: str) -> np.ndarray:
        if not self._wav_repeat:
            spoken = espeak(text)
            if spoken is not None and spoken[1] == self.sample_rate:
                return spoken[0]
            log.warning("espeak-ng failed: speaking the bundled sentence instead")
            return resample_linear(self._wav, 16000, self.sample_rate)
        return np.concatenate([self._wav] * self._wav_repeat)

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = CONNECT) -> tts.ChunkedStream:
        return _SpokenStream(tts=self, input_text=text, conn_options=conn_options)


def _kiosk_of(ctx: JobContext) -> tuple[str | None, str | None]:
    """The avatar to speak through and the visitor to listen to: from the job's metadata
    (the kiosk puts them there), else the room's avatar (it names its agent in an attribute)."""
    try:
        fields = json.loads(ctx.job.metadata or "{}")
    except ValueError:
        fields = {}
    avatar, visitor = fields.get("kiosk_avatar"), fields.get("kiosk_visitor")
    if avatar is None:
        avatar = next((p.identity for p in ctx.room.remote_participants.values()
                       if PUBLISH_ON_BEHALF in p.attributes), None)
    return avatar, visitor


def prewarm(proc: JobProcess) -> None:
    from livekit.plugins import silero

    proc.userdata["vad"] = silero.VAD.load()


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    avatar, visitor = _kiosk_of(ctx)
    log.info("job %s in room %s: avatar %s, visitor %s", ctx.job.id, ctx.room.name, avatar, visitor)
    session: AgentSession = AgentSession(stt=HeardSTT(), llm=ReplyLLM(), tts=SpokenTTS(), vad=ctx.proc.userdata["vad"])
    if avatar is not None:
        # what every avatar plugin does: the session's voice goes to the avatar, not into the room
        session.output.audio = DataStreamAudioOutput(ctx.room, destination_identity=avatar,
                                                     wait_remote_track=rtc.TrackKind.KIND_VIDEO)
    options = room_io.RoomOptions(participant_identity=visitor) if visitor else room_io.RoomOptions()
    await session.start(agent=Agent(instructions="greet the visitor, then answer"), room=ctx.room,
                        room_options=options)
    session.say(GREETING)


def main() -> None:
    cli.run_app(WorkerOptions(
        entrypoint_fnc=entrypoint, prewarm_fnc=prewarm,
        agent_name=os.environ.get("EXAMPLE_AGENT_NAME", AGENT_NAME),
        num_idle_processes=1,
        # a development machine is busy (the kiosk renders beside it): never report "full"
        load_fnc=lambda *_: 0.0))


if __name__ == "__main__":
    main()
