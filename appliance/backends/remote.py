"""A remote avatar worker as the kiosk's private back-end: speech relayed down, frames up.

The kiosk stays the avatar. The conversation agent keeps sending its speech to the kiosk and
viewers keep watching the kiosk's own tracks; the worker (bitHuman's cloud avatar, or a GPU
container's) joins the room with a token the kiosk minted (kind agent,
``lk.publish_on_behalf`` = the kiosk, no secret anywhere), and this session

* relays each speech segment to it as a byte stream on ``lk.audio_stream`` (queued until the
  worker has published its video: bitHuman drops audio sent before it joined), and a
  barge-in as ``lk.clear_buffer``;
* turns its video and audio tracks into the kiosk's frames (fitted to the kiosk's size,
  640 samples of its voice with each picture) for the fan-out: the same tracks, screen and
  speaker as local frames, no re-subscription at any viewer;
* marks the frames between the worker's ``lk.playback_started`` and ``lk.playback_finished``
  as speech, with ``end_of_speech`` (and the position the worker played, ``played_s``) on the
  last, so the room's agent link reports playback to the agent exactly as it does for local
  frames (one ``playback_finished`` per segment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator

import numpy as np
from livekit import rtc

from appliance.runtimes import AUDIO_SAMPLE_RATE, Frame, VideoSpec
from appliance.tasks import TaskOwner

__all__ = ["RemoteSession", "fit"]

log = logging.getLogger("appliance.backends.remote")

SAMPLES_PER_FRAME = AUDIO_SAMPLE_RATE // 25
MAX_AUDIO_BACKLOG = AUDIO_SAMPLE_RATE // 5  # 200 ms: beyond it the oldest voice is dropped
MAX_QUEUED_SPEECH_S = 30.0  # speech waiting for a worker that has not published yet
RPC_TIMEOUT_S = 2.0


def fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` scaled (nearest neighbour) into width x height, centred on black."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = min(width / w, height / h)
    tw, th = max(1, int(w * scale)), max(1, int(h * scale))
    rows = (np.arange(th) * h // th).clip(0, h - 1)
    cols = (np.arange(tw) * w // tw).clip(0, w - 1)
    out = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - th) // 2, (width - tw) // 2
    out[y0:y0 + th, x0:x0 + tw] = image[rows][:, cols]
    return out


class RemoteSession:
    """One worker ``identity`` in ``room``, serving as the kiosk's avatar until closed."""

    def __init__(self, room: rtc.Room, identity: str, video: VideoSpec) -> None:
        self.room, self.identity, self.video = room, identity, video
        self.first_frame = asyncio.Event()  # the worker's first picture decoded here
        self.gone = asyncio.Event()  # the worker left the room
        self.frames_relayed = 0
        self.segments = 0
        self._speech: asyncio.Queue[tuple[str, bytes, int]] = asyncio.Queue()
        self._queued_s = 0.0
        self._audio: deque[np.ndarray] = deque()
        self._audio_samples = 0
        self._drop_voice = False  # after a barge-in, until the next reply goes to the worker
        self._pictures: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=3)
        self._speaking = False
        self._ended: float | None = None  # the worker said playback_finished at this position
        self._tasks = TaskOwner("relay", log)
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for the worker's tracks and playback calls; relay speech once it is ready."""
        room, local = self.room, self.room.local_participant
        room.on("track_published", self._on_published)
        room.on("track_subscribed", self._on_track)
        room.on("participant_disconnected", self._on_left)
        local.register_rpc_method("lk.playback_started", self._on_playback_started)
        local.register_rpc_method("lk.playback_finished", self._on_playback_finished)
        worker = room.remote_participants.get(self.identity)
        if worker is not None:  # joined before we listened
            for publication in worker.track_publications.values():
                if publication.track is not None:
                    self._on_track(publication.track, publication, worker)
                else:
                    self._on_published(publication, worker)
        self._tasks.spawn(self._relay_speech(), "speech to the worker")

    async def close(self) -> None:
        self._closed = True
        self.room.off("track_published", self._on_published)
        self.room.off("track_subscribed", self._on_track)
        self.room.off("participant_disconnected", self._on_left)
        with contextlib.suppress(Exception):
            self.room.local_participant.unregister_rpc_method("lk.playback_started")
            self.room.local_participant.unregister_rpc_method("lk.playback_finished")
        await self._tasks.close()
        with contextlib.suppress(asyncio.QueueFull):
            self._pictures.put_nowait(np.zeros(0, np.uint8))  # wakes frames(): it ends

    def _on_left(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity == self.identity:
            log.info("remote worker %s left the room", self.identity)
            self.gone.set()  # frames() just stops yielding: hold frames until the ladder switches

    # -- frames up ------------------------------------------------------------------------

    def _on_published(self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        """The kiosk joins with auto_subscribe off: it subscribes to its worker's tracks only."""
        if participant.identity == self.identity:
            publication.set_subscribed(True)

    def _on_track(self, track: rtc.Track, publication: object, participant: rtc.RemoteParticipant) -> None:
        if participant.identity != self.identity:
            return
        if track.kind == rtc.TrackKind.KIND_VIDEO:
            self._tasks.spawn(self._read_video(track), "worker video")
        elif track.kind == rtc.TrackKind.KIND_AUDIO:
            self._tasks.spawn(self._read_audio(track), "worker audio")

    async def _read_video(self, track: rtc.Track) -> None:
        async for event in rtc.VideoStream(track):
            rgb = event.frame.convert(rtc.VideoBufferType.RGB24)
            image = np.frombuffer(rgb.data, np.uint8).reshape(rgb.height, rgb.width, 3)
            picture = fit(image, self.video.width, self.video.height)
            if self._pictures.full():  # nobody consumes yet (still launching): keep the newest
                self._pictures.get_nowait()
            self._pictures.put_nowait(picture.copy() if picture is image else picture)
            self.first_frame.set()

    async def _read_audio(self, track: rtc.Track) -> None:
        async for event in rtc.AudioStream(track, sample_rate=AUDIO_SAMPLE_RATE, num_channels=1):
            if self._drop_voice:
                continue
            samples = np.frombuffer(event.frame.data, np.int16).copy()
            self._audio.append(samples)
            self._audio_samples += len(samples)
            while self._audio_samples > MAX_AUDIO_BACKLOG:  # the worker runs ahead: drop, never lag
                self._audio_samples -= len(self._audio.popleft())

    def _take_audio(self) -> np.ndarray:
        out = np.zeros(SAMPLES_PER_FRAME, np.int16)
        filled = 0
        while filled < SAMPLES_PER_FRAME and self._audio:
            chunk = self._audio[0]
            n = min(len(chunk), SAMPLES_PER_FRAME - filled)
            out[filled:filled + n] = chunk[:n]
            filled += n
            if n == len(chunk):
                self._audio.popleft()
            else:
                self._audio[0] = chunk[n:]
            self._audio_samples -= n
        return out

    async def frames(self) -> AsyncIterator[Frame]:
        """The worker's pictures with its voice, until the session is closed (the ladder
        switches the fan-out away first: a source that ends stops the fan-out)."""
        while not self._closed:
            picture = await self._pictures.get()
            if picture.size == 0:
                return
            self.frames_relayed += 1
            ended, self._ended = self._ended, None
            meta = {"backend": "remote"}
            if ended is not None:  # what the worker played, which the agent link reports
                meta["played_s"] = f"{ended:.3f}"
            yield Frame(picture, self._take_audio(), speaking=self._speaking or ended is not None,
                        end_of_speech=ended is not None, meta=meta)

    # -- speech down ----------------------------------------------------------------------

    def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> bool:
        seconds = len(pcm16) / 2 / sample_rate
        if self._queued_s + seconds > MAX_QUEUED_SPEECH_S and not self.first_frame.is_set():
            return False  # the worker is not there yet and the queue is full
        self._queued_s += seconds
        self._speech.put_nowait(("audio", pcm16, sample_rate))
        if last_chunk:
            self.flush()
        return True

    def flush(self) -> bool:
        self._speech.put_nowait(("end", b"", 0))
        return True

    def interrupt(self) -> bool:
        """Barge-in: what waits here is dropped; the worker is told to drop its own."""
        while not self._speech.empty():
            self._speech.get_nowait()
        self._queued_s = 0.0
        self._speech.put_nowait(("clear", b"", 0))
        self._audio.clear()
        self._audio_samples = 0
        # what the worker voiced before it got the clear is still on its way here (a relay
        # behind by ~1 s: measured 2 s of voice at the viewer after a barge-in): none of it
        # is played, until the next reply goes to the worker
        self._drop_voice = True
        return True

    async def _relay_speech(self) -> None:
        """One byte stream per segment, chunks forwarded as they come."""
        await self.first_frame.wait()  # audio sent before the worker is ready would be lost
        writer: rtc.ByteStreamWriter | None = None
        while True:
            kind, data, rate = await self._speech.get()
            try:
                writer = await self._relay_one(writer, kind, data, rate)
            except Exception as exc:  # the worker went away mid-segment: the ladder sees that
                log.info("relaying speech to the remote worker: %r", exc)
                writer = None

    async def _relay_one(self, writer: rtc.ByteStreamWriter | None, kind: str, data: bytes,
                         rate: int) -> rtc.ByteStreamWriter | None:
        """One queued item to the worker; returns the segment's writer while it is open."""
        local = self.room.local_participant
        if kind == "audio":
            self._queued_s = max(0.0, self._queued_s - len(data) / 2 / rate)
            if writer is None:
                self._drop_voice = False  # a new reply: the worker's voice is wanted again
                writer = await local.stream_bytes(
                    "AUDIO_STREAM", topic="lk.audio_stream", destination_identities=[self.identity],
                    attributes={"sample_rate": str(rate), "num_channels": "1"})
                self.segments += 1
            await writer.write(data)
            return writer
        if writer is not None:  # the segment ends, or is cut
            with contextlib.suppress(Exception):
                await writer.aclose()
        if kind == "clear":
            try:
                await local.perform_rpc(destination_identity=self.identity, method="lk.clear_buffer",
                                        payload="", response_timeout=RPC_TIMEOUT_S)
            except Exception as exc:  # the worker may be gone: the ladder sees that
                log.info("clear_buffer to the remote worker: %s", exc)
        return None

    # -- playback, as the worker reports it ----------------------------------------------

    def _caller_ok(self, data: rtc.RpcInvocationData) -> bool:
        return data.caller_identity == self.identity

    def _on_playback_started(self, data: rtc.RpcInvocationData) -> str:
        if self._caller_ok(data):
            self._speaking = True
        return "ok"

    def _on_playback_finished(self, data: rtc.RpcInvocationData) -> str:
        if self._caller_ok(data):
            try:
                payload = json.loads(data.payload or "{}")
                interrupted = bool(payload.get("interrupted"))
                position = float(payload.get("playback_position", 0.0))
            except (ValueError, TypeError, AttributeError):
                interrupted, position = False, 0.0
            if not interrupted:
                self._ended = position  # the agent link reports it with the next frame
            self._speaking = False
        return "ok"

    def status(self) -> dict[str, object]:
        return {"worker": self.identity, "frames_relayed": self.frames_relayed, "segments": self.segments,
                "first_frame": self.first_frame.is_set(), "gone": self.gone.is_set()}
