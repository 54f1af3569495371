"""See and hear the kiosk: a stand-in agent that speaks, and a viewer that records.

``appliance demo`` joins the dev server twice: as an *agent* (token kind
"agent") that sends a sentence to the kiosk with LiveKit Agents'
``DataStreamAudioOutput`` — exactly what a real conversation agent does — and
as a viewer that subscribes to the kiosk's tracks and writes an MP4. The same
two classes drive the end-to-end tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import logging
import time
import wave
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from livekit import api, rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput

__all__ = ["AgentVoice", "Viewer", "AudioReceiveStats", "ReceivedFrame", "make_token", "read_wav", "run_demo"]

log = logging.getLogger("appliance.dev.demo")


def make_token(api_key: str, api_secret: str, room: str, identity: str, *, agent: bool = False,
               hidden: bool = False) -> str:
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True,
                                     can_subscribe=True, can_publish_data=True,
                                     # an agent sets its own lk.agent.state attribute
                                     can_update_own_metadata=agent, hidden=hidden))
    )
    if agent:
        token = token.with_kind("agent")
    return token.to_jwt()


def read_wav(path: Path | None = None) -> tuple[np.ndarray, int]:
    """Mono int16 samples and rate; the bundled sentence by default."""
    source = path or Path(str(resources.files("appliance") / "data" / "hello.wav"))
    with wave.open(str(source), "rb") as wav:
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return pcm, rate


class AgentVoice:
    """A minimal LiveKit Agents avatar driver: DataStreamAudioOutput to the kiosk."""

    def __init__(self, kiosk_identity: str) -> None:
        self.kiosk_identity = kiosk_identity
        self.room = rtc.Room()
        self.output: DataStreamAudioOutput | None = None
        self.finished: list[tuple[float, bool]] = []  # (playback_position, interrupted)
        self.finished_event = asyncio.Event()

    async def connect(self, url: str, token: str) -> None:
        # an avatar's driver watches nothing (a real agent subscribes to the user's audio only)
        await self.room.connect(url, token, rtc.RoomOptions(auto_subscribe=False, connect_timeout=10))
        self.output = DataStreamAudioOutput(
            self.room, destination_identity=self.kiosk_identity,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO,
        )
        self.output.on("playback_finished", self._on_finished)

    def _on_finished(self, event: object) -> None:
        position = float(getattr(event, "playback_position", 0.0))
        interrupted = bool(getattr(event, "interrupted", False))
        log.info("playback finished at %.2f s (interrupted=%s)", position, interrupted)
        self.finished.append((position, interrupted))
        self.finished_event.set()

    async def say(self, pcm: np.ndarray, rate: int, *, chunk_ms: int = 20, realtime: bool = True) -> None:
        """Send speech the way a TTS does: small frames, roughly in real time, then flush."""
        assert self.output is not None
        step = rate * chunk_ms // 1000
        start = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), step)):
            chunk = pcm[offset:offset + step]
            await self.output.capture_frame(rtc.AudioFrame(chunk.tobytes(), rate, 1, len(chunk)))
            if realtime:
                # TTS runs ahead of playback; 2x real time is typical
                delay = start + (index + 1) * chunk_ms / 2000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        self.output.flush()

    def interrupt(self) -> None:
        """Barge-in as an AgentSession does it (after cancelling its say()): end the segment,
        then send lk.clear_buffer."""
        assert self.output is not None
        self.output.flush()
        self.output.clear_buffer()

    async def close(self) -> None:
        await self.room.disconnect()


@dataclass(frozen=True)
class AudioReceiveStats:
    """WebRTC inbound-rtp counters; differences of two give a window's figures."""

    jitter_buffer_delay_s: float  # summed over emitted samples
    jitter_buffer_emitted: int
    concealed_samples: int  # made up by the receiver: late or missing audio (gaps, clicks)
    samples_received: int

    def since(self, earlier: AudioReceiveStats) -> tuple[float, float]:
        """(mean jitter buffer delay in ms, % of samples concealed) between the two."""
        emitted = self.jitter_buffer_emitted - earlier.jitter_buffer_emitted
        received = self.samples_received - earlier.samples_received
        delay = self.jitter_buffer_delay_s - earlier.jitter_buffer_delay_s
        concealed = self.concealed_samples - earlier.concealed_samples
        return (1000 * delay / emitted if emitted else float("nan"),
                100 * concealed / received if received else float("nan"))


@dataclass
class ReceivedFrame:
    at: float  # monotonic arrival time
    image: np.ndarray  # RGB (H, W, 3)


@dataclass
class Viewer:
    """Subscribes to one participant's video and audio and keeps what arrives."""

    identity: str
    keep_images: bool = True
    frames: list[ReceivedFrame] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    audio_times: list[float] = field(default_factory=list)
    audio_rate: int = 48000

    def __post_init__(self) -> None:
        self.room = rtc.Room()
        self._tasks: list[asyncio.Task[None]] = []
        self.video_started = asyncio.Event()
        self.audio_track: rtc.Track | None = None

    async def connect(self, url: str, token: str) -> None:
        # only the watched participant's tracks: each subscription costs the server an encode
        self.room.on("track_published", self._on_published)
        self.room.on("track_subscribed", self._on_track)
        await self.room.connect(url, token, rtc.RoomOptions(auto_subscribe=False, connect_timeout=10))
        # tracks that were published before the handlers saw them
        for participant in self.room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None:
                    self._on_track(publication.track, publication, participant)
                else:
                    self._on_published(publication, participant)

    def _on_published(self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self.identity:
            publication.set_subscribed(True)

    def _on_track(self, track: rtc.Track, publication: object, participant: rtc.RemoteParticipant) -> None:
        if participant.identity != self.identity:
            return
        if track.kind == rtc.TrackKind.KIND_VIDEO and not any(t.get_name() == "video" for t in self._tasks):
            self._tasks.append(asyncio.create_task(self._read_video(track), name="video"))
        elif track.kind == rtc.TrackKind.KIND_AUDIO and not any(t.get_name() == "audio" for t in self._tasks):
            self._tasks.append(asyncio.create_task(self._read_audio(track), name="audio"))

    async def _read_video(self, track: rtc.Track) -> None:
        async for event in rtc.VideoStream(track):
            now = time.monotonic()
            self.frame_times.append(now)
            self.video_started.set()
            if self.keep_images:
                rgb = event.frame.convert(rtc.VideoBufferType.RGB24)
                image = np.frombuffer(rgb.data, dtype=np.uint8).reshape(rgb.height, rgb.width, 3)
                self.frames.append(ReceivedFrame(now, image.copy()))

    async def _read_audio(self, track: rtc.Track) -> None:
        self.audio_track = track
        async for event in rtc.AudioStream(track, sample_rate=self.audio_rate, num_channels=1):
            samples = np.frombuffer(event.frame.data, dtype=np.int16).copy()
            self.audio.append(samples)
            self.audio_times.append(time.monotonic())

    async def audio_receive_stats(self) -> AudioReceiveStats:
        """Counters of the subscriber's audio receiver so far (zeros before audio arrives)."""
        if self.audio_track is not None:
            for stats in await self.audio_track.get_stats():
                if stats.HasField("inbound_rtp"):
                    inbound = stats.inbound_rtp.inbound
                    return AudioReceiveStats(inbound.jitter_buffer_delay, inbound.jitter_buffer_emitted_count,
                                             inbound.concealed_samples, inbound.total_samples_received)
        return AudioReceiveStats(0.0, 0, 0, 0)

    def intervals_ms(self, since: float = 0.0, until: float = float("inf")) -> np.ndarray:
        """Milliseconds between consecutive frame arrivals within [since, until]."""
        times = np.array([t for t in self.frame_times if since <= t <= until])
        return np.diff(times) * 1000.0

    def max_interval_ms(self, since: float = 0.0, until: float = float("inf")) -> float:
        """The longest wait for a frame within [since, until] (nan with fewer than 2 frames)."""
        intervals = self.intervals_ms(since, until)
        return float(intervals.max()) if len(intervals) else float("nan")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.room.disconnect()

    def write_mp4(self, path: Path) -> None:
        """Video at its arrival times and the audio track, with PyAV."""
        import av

        if not self.frames:
            raise RuntimeError("no video frames were received")
        container = av.open(str(path), "w")
        height, width = self.frames[0].image.shape[:2]
        vstream = container.add_stream("mpeg4", rate=25)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        astream = container.add_stream("aac", rate=self.audio_rate)
        t0, last_pts = self.frames[0].at, -1
        for frame in self.frames:
            vf = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
            # arrival time decides the pts; it must still grow strictly
            vf.pts = last_pts = max(last_pts + 1, int(round((frame.at - t0) * 25)))
            for packet in vstream.encode(vf):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if self.audio:
            pcm = np.concatenate(self.audio)
            step = astream.codec_context.frame_size or 1024  # AAC takes fixed-size frames
            for index, offset in enumerate(range(0, len(pcm), step)):
                chunk = pcm[offset:offset + step]
                if len(chunk) < step:
                    chunk = np.pad(chunk, (0, step - len(chunk)))
                af = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
                af.sample_rate, af.pts = self.audio_rate, index * step
                for packet in astream.encode(af):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
        container.close()


async def demo(out: Path, seconds: float, text: str) -> None:
    from appliance.dev.local import DEV_API_KEY, dev_secret, dev_url

    secret = dev_secret().reveal()
    room, kiosk = "lobby", "kiosk"
    viewer = Viewer(kiosk)
    await viewer.connect(dev_url(), make_token(DEV_API_KEY, secret, room, "demo-viewer"))
    voice = AgentVoice(kiosk)
    await voice.connect(dev_url(), make_token(DEV_API_KEY, secret, room, "demo-agent", agent=True))
    await asyncio.wait_for(viewer.video_started.wait(), timeout=15)
    pcm, rate = _speech(text)
    await asyncio.sleep(1.0)
    await voice.say(pcm, rate)
    await asyncio.sleep(max(0.0, seconds - 1.0 - len(pcm) / rate / 2))
    await voice.close()
    await viewer.close()
    viewer.write_mp4(out)
    fps = len(viewer.frame_times) / max(viewer.frame_times[-1] - viewer.frame_times[0], 1e-6)
    print(f"wrote {out}: {len(viewer.frames)} frames ({fps:.1f} fps), "
          f"{sum(len(a) for a in viewer.audio) / viewer.audio_rate:.1f} s of audio; "
          f"playback finished: {voice.finished}")


def _speech(text: str) -> tuple[np.ndarray, int]:
    """espeak-ng if present, else the bundled WAV."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("espeak-ng"):
        with tempfile.NamedTemporaryFile(suffix=".wav") as handle:
            subprocess.run(["espeak-ng", "-w", handle.name, text], check=True)
            return read_wav(Path(handle.name))
    return read_wav()


def run_demo(out: Path, seconds: float, text: str) -> int:
    try:
        asyncio.run(demo(out, seconds, text))
    except TimeoutError:
        print("no video from the kiosk: is `make run` running?")
        return 1
    return 0
