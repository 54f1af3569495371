"""Barge-in, measured at a subscriber: ``clear_to_silence_ms``.

An agent speaks to an avatar with LiveKit Agents' ``DataStreamAudioOutput``
and interrupts it the way an ``AgentSession`` does on barge-in (the speech
task is cancelled, then ``flush()`` and ``clear_buffer()``, which sends the
``lk.clear_buffer`` RPC). A separate viewer subscribes to the avatar's audio.

*Silent at the subscriber*: every 10 ms chunk of audio the viewer receives
has an RMS below ``SILENCE_RMS`` (about -40 dBFS) from that moment on, for at
least ``HOLD_S``. ``clear_to_silence_ms`` is the time from the agent calling
``clear_buffer()`` to the arrival of the last loud chunk. The agent speaks a
synthetic voiced signal that is loud in every chunk, so a pause in the
speech cannot pass for the end of it.

Used by ``appliance.dev.bench`` (the kiosk, and a stock ``AvatarRunner`` stand-in
started with ``LIVEKIT_TOKEN=T python -m appliance.dev.bench_bargein --url U``) and by
the end-to-end test of barge-in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    DataStreamAudioReceiver,
    VideoGenerator,
)

from appliance.dev.demo import AgentVoice, Viewer
from appliance.runtimes import AUDIO_SAMPLE_RATE
from appliance.runtimes.reference import ReferenceRuntime, bundled_model_path

__all__ = [
    "SILENCE_RMS",
    "HOLD_S",
    "Interruption",
    "speech_signal",
    "chunk_rms",
    "last_loud_at",
    "clear_to_silence_ms",
    "interrupt_once",
    "measure",
    "summary",
]

SILENCE_RMS = 300.0  # int16 RMS of one received 10 ms chunk; the test signal is ~10x louder
HOLD_S = 1.5  # silent for at least this long after the last loud chunk
SPEECH_RATE = 24000  # what a TTS typically produces


def speech_signal(seconds: float, rate: int = SPEECH_RATE) -> np.ndarray:
    """A voiced, vowel-like int16 signal (140 Hz and harmonics, syllable-rate swell) that is
    loud in every 10 ms: any silence the viewer hears is the interruption, not a pause."""
    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    swell = 0.75 + 0.25 * np.sin(2 * np.pi * 3.5 * t)
    peak = float(np.max(np.abs(voice)))
    return (voice / peak * swell * 9000).astype(np.int16)


def chunk_rms(chunk: np.ndarray) -> float:
    return float(np.sqrt(np.mean(chunk.astype(np.float64) ** 2))) if len(chunk) else 0.0


def last_loud_at(viewer: Viewer, since: float) -> float | None:
    """Arrival time of the last loud chunk after ``since``, or None."""
    for samples, at in zip(reversed(viewer.audio), reversed(viewer.audio_times), strict=False):
        if at <= since:
            return None
        if chunk_rms(samples) >= SILENCE_RMS:
            return at
    return None


async def clear_to_silence_ms(viewer: Viewer, cleared_at: float, timeout_s: float = 15.0) -> float:
    """Wait until the viewer has heard nothing loud for HOLD_S (and at least HOLD_S after
    ``cleared_at``); milliseconds from ``cleared_at`` to the last loud chunk (0 if none)."""
    while True:
        now = time.monotonic()
        last = last_loud_at(viewer, cleared_at) or cleared_at
        if now - last >= HOLD_S and viewer.audio_times and viewer.audio_times[-1] >= last + HOLD_S:
            return (last - cleared_at) * 1000.0
        if now - cleared_at > timeout_s:
            raise TimeoutError(f"the avatar was still speaking {timeout_s:.0f} s after clear_buffer")
        await asyncio.sleep(0.05)


@dataclass
class Interruption:
    clear_to_silence_ms: float
    finished_after_ms: float | None  # lk.playback_finished(interrupted=True) after clear_buffer
    interrupted: bool  # what that playback_finished said


async def interrupt_once(voice: AgentVoice, viewer: Viewer, *, talk_s: float) -> Interruption:
    """Speak, let the viewer hear it for ``talk_s``, interrupt, and measure."""
    pcm = speech_signal(talk_s + 6.0)
    started = time.monotonic()
    talking = asyncio.create_task(voice.say(pcm, SPEECH_RATE))
    deadline = started + 10.0
    while last_loud_at(viewer, started) is None:
        if time.monotonic() > deadline:
            talking.cancel()
            raise TimeoutError("the viewer never heard the avatar speak")
        await asyncio.sleep(0.02)
    await asyncio.sleep(talk_s)
    voice.finished_event.clear()
    # what an AgentSession does on barge-in: cancel the speech, flush, clear the buffer
    talking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await talking
    cleared_at = time.monotonic()
    voice.interrupt()
    finished_after: float | None = None
    interrupted = False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(voice.finished_event.wait(), 5.0)
        finished_after = (time.monotonic() - cleared_at) * 1000.0
        interrupted = voice.finished[-1][1]
    silent_ms = await clear_to_silence_ms(viewer, cleared_at)
    return Interruption(silent_ms, finished_after, interrupted)


async def measure(voice: AgentVoice, viewer: Viewer, count: int, seed: int = 9) -> list[Interruption]:
    rng = random.Random(seed)
    results = []
    for _ in range(count):
        results.append(await interrupt_once(voice, viewer, talk_s=rng.uniform(0.6, 1.6)))
        await asyncio.sleep(0.3)
    return results


def summary(results: list[Interruption]) -> dict[str, float]:
    values = [r.clear_to_silence_ms for r in results]
    return {
        "p50_ms": statistics.median(values),
        "max_ms": max(values),
        "n": float(len(values)),
        "not_reported": float(sum(1 for r in results if not r.interrupted)),
    }


# -------------------------------------------------------------------- the baseline


class ReferenceGenerator(VideoGenerator):
    """Our reference avatar as a plain LiveKit Agents ``VideoGenerator``, in-process.

    The same face and the same per-frame audio slices as the kiosk, without its
    renderer child and its own publishing: what remains different is the stock
    pipeline (``AvatarRunner`` with its ``AVSynchronizer`` and 100 ms queues).
    ``clear_buffer`` does what LiveKit's avatar examples do: drop the generator's
    own queued audio."""

    def __init__(self, options: AvatarOptions) -> None:
        self._options = options
        self._runtime = ReferenceRuntime(width=options.video_width, height=options.video_height)
        self._segment_open = False

    async def open(self) -> None:
        await self._runtime.open(bundled_model_path())

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            await self._runtime.flush()
            return
        self._segment_open = True
        await self._runtime.push_audio(bytes(frame.data), frame.sample_rate)

    async def clear_buffer(self) -> None:
        await self._runtime.interrupt()
        self._segment_open = False

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        opts = self._options
        async for frame in self._runtime.frames():
            yield rtc.VideoFrame(opts.video_width, opts.video_height, rtc.VideoBufferType.RGB24,
                                 frame.image.tobytes())
            yield rtc.AudioFrame(frame.audio.tobytes(), AUDIO_SAMPLE_RATE, 1, len(frame.audio))
            if frame.end_of_speech and self._segment_open:
                self._segment_open = False
                yield AudioSegmentEnd()


async def run_baseline(url: str, token: str) -> None:
    """A stock-AvatarRunner avatar worker until SIGTERM."""
    room = rtc.Room()
    await room.connect(url, token, rtc.RoomOptions(connect_timeout=10))
    # AvatarRunner publishes with the SDK's default options: from about 480 px wide that turns
    # on simulcast, which the dev server does not relay; just below it keeps one layer
    options = AvatarOptions(video_width=464, video_height=464, video_fps=25.0,
                            audio_sample_rate=AUDIO_SAMPLE_RATE, audio_channels=1)
    generator = ReferenceGenerator(options)
    await generator.open()
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room),
                          video_gen=generator, options=options)
    await runner.start()
    print("baseline avatar ready", flush=True)
    await runner.wait_for_complete()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.dev.bench_bargein",
                                     description="the stock-AvatarRunner stand-in of the benchmark")
    parser.add_argument("--url", required=True)
    args = parser.parse_args(argv)
    token = os.environ.get("LIVEKIT_TOKEN", "")  # not in argv: ps shows argv to everyone
    if not token:
        parser.error("set LIVEKIT_TOKEN to the worker's join token")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_baseline(args.url, token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
