"""The kiosk's two tracks in the room, fed frame by frame: a frame sink.

Picture and voice leave the kiosk together. Each frame's audio slice goes into
the native ``rtc.AudioSource``, which releases it to WebRTC in real time from a
short queue (``AUDIO_STEADY_S``, 60 ms); ``rtc.AVSynchronizer`` paces the
pictures at the frame rate, capturing each one up to a frame after it is
pushed. So a picture is pushed one frame after its audio (``PICTURE_DELAY``):
it then leaves 40-80 ms after its audio went into the queue, as its audio does,
instead of ~60 ms before its voice. (Scheduling each picture for the moment its
audio plays, measured from the queue, lined them up as well but cost the
supervisor ~100 MB of resident memory in the benchmark: libwebrtc's frame
buffers grow when pictures come unevenly.)

The queue is kept short (``AUDIO_QUEUE_MS``) so that an interrupt never waits
behind buffered speech, and never empty (``AUDIO_STEADY_S`` of silence while
idle, and after a barge-in): a gap on the wire makes every subscriber's jitter
buffer, and with it the voice's delay, grow for good.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass

import numpy as np
from livekit import rtc

from appliance.runtimes import AUDIO_SAMPLE_RATE, Frame, VideoSpec
from appliance.tasks import TaskOwner

__all__ = ["TrackPublisher", "PublishOptions", "AUDIO_QUEUE_MS", "AUDIO_STEADY_S"]

log = logging.getLogger("appliance.room")

# Audio queued ahead of the wire, at most (capture_frame waits beyond it). The stock
# AvatarRunner uses 100 ms too.
AUDIO_QUEUE_MS = 100
# What stays queued while nothing is said, and what a barge-in leaves (as silence): enough
# to ride out the frame pump's jitter.
AUDIO_STEADY_S = 0.06
# Frames a picture waits for its audio: what the audio waits in the queue (AUDIO_STEADY_S),
# less the synchronizer's own wait (half a frame on average), in whole frames.
PICTURE_DELAY = 1


@dataclass(frozen=True)
class PublishOptions:
    simulcast: bool = False
    max_bitrate_kbps: int = 1500


class TrackPublisher:
    """Publishes ``avatar-video`` and ``avatar-audio`` in one room and feeds them."""

    def __init__(self, video: VideoSpec, options: PublishOptions) -> None:
        self._video, self._options = video, options
        self._audio_source = rtc.AudioSource(AUDIO_SAMPLE_RATE, 1, queue_size_ms=AUDIO_QUEUE_MS)
        self._video_source = rtc.VideoSource(video.width, video.height)
        self._audio_lock = asyncio.Lock()  # the native source refuses a capture while one waits
        self._interrupts = 0  # barge-ins so far: a speech frame on its way when one came is muted
        self._av_sync = rtc.AVSynchronizer(audio_source=self._audio_source,
                                           video_source=self._video_source,
                                           video_fps=video.fps, video_queue_size_ms=100)
        self._held: collections.deque[np.ndarray] = collections.deque()  # pictures waiting
        self._closed = False
        self._tasks = TaskOwner("room", log)
        self.frames_published = 0

    async def publish(self, room: rtc.Room) -> None:
        audio_track = rtc.LocalAudioTrack.create_audio_track("avatar-audio", self._audio_source)
        video_track = rtc.LocalVideoTrack.create_video_track("avatar-video", self._video_source)
        await room.local_participant.publish_track(
            audio_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        # Without an explicit VideoEncoding the SDK's preset caps small video at 20 fps.
        encoding = rtc.VideoEncoding(
            max_framerate=self._video.fps, max_bitrate=self._options.max_bitrate_kbps * 1000
        )
        await room.local_participant.publish_track(
            video_track,
            rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_CAMERA,
                simulcast=self._options.simulcast,
                video_encoding=encoding,
            ),
        )

    async def send_frame(self, frame: Frame) -> None:
        """The frame's audio into the queue; the previous frame's picture to the synchronizer."""
        if self._closed:
            return
        interrupts = self._interrupts
        self._held.append(frame.image)
        picture = self._held.popleft() if len(self._held) > PICTURE_DELAY else frame.image
        height, width = picture.shape[:2]
        await self._av_sync.push(rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, picture.tobytes()))
        audio = frame.audio
        if not frame.speaking:
            audio = self._steady(audio)
        async with self._audio_lock:
            if frame.speaking and interrupts != self._interrupts:
                audio = np.zeros_like(audio)  # interrupted while this frame waited
            if len(audio):
                await self._audio_source.capture_frame(
                    rtc.AudioFrame(audio.tobytes(), AUDIO_SAMPLE_RATE, 1, len(audio)))
        self.frames_published += 1

    def _steady(self, silence: np.ndarray) -> np.ndarray:
        """Silence, more or less of it: idle frames bring the queued audio back to
        AUDIO_STEADY_S (speech is never stretched or cut for it)."""
        queued = self._audio_source.queued_duration
        frame_s = len(silence) / AUDIO_SAMPLE_RATE
        if queued > AUDIO_STEADY_S + frame_s:
            return silence[:0]
        if queued < AUDIO_STEADY_S - frame_s:
            return np.zeros(2 * len(silence), np.int16)
        return silence

    def clear(self) -> float:
        """Barge-in: drop the queued voice, leave a little silence; returns the seconds of
        audio that were queued and will now never be heard."""
        self._interrupts += 1
        unplayed = self._audio_source.queued_duration
        self._audio_source.clear_queue()
        silence = np.zeros(int(AUDIO_STEADY_S * AUDIO_SAMPLE_RATE), np.int16)
        self._tasks.spawn(self._capture_silence(silence), "barge-in silence")
        return unplayed

    async def _capture_silence(self, pcm: np.ndarray) -> None:
        async with self._audio_lock:
            if not self._closed:
                await self._audio_source.capture_frame(
                    rtc.AudioFrame(pcm.tobytes(), AUDIO_SAMPLE_RATE, 1, len(pcm)))

    async def aclose(self) -> None:
        self._closed = True
        await self._tasks.close()
        await self._av_sync.aclose()
        for source in (self._audio_source, self._video_source):
            try:
                await source.aclose()
            except Exception as exc:  # already gone with the room
                log.debug("closing a track source: %r", exc)
