"""A stand-in for a remote avatar worker (bitHuman's cloud avatar, or its GPU container's),
spawned by the fakes in ``fake_bithuman.py`` with exactly the token the kiosk sent them.

Built as LiveKit's own avatar workers are (``AvatarRunner`` with a ``VideoGenerator``): it
joins with the token's identity, kind and attributes, takes speech only from the participant
its ``lk.publish_on_behalf`` names (the first agent when the attribute is missing: bitHuman's
binding before 2026-07), answers ``lk.clear_buffer``, calls ``lk.playback_started`` /
``lk.playback_finished`` on the sender, and publishes ``avatar_audio`` and ``avatar_video``.
Its face is our reference avatar with a coloured band on top naming the rung (``--tag``), so
a test's viewer can tell whose frames are on the kiosk's track.

Faults for tests: ``--crash-after-s`` (exit hard N s after the first speech arrives),
``--idle-timeout-s`` (leave after N s without speech, like the GPU container's
SESSION_IDLE_TIMEOUT). It leaves on its own when the last standard participant leaves
(the cloud's rule), and when it is removed or the room closes.

    LIVEKIT_TOKEN=... python -m appliance.dev.remote_worker --url ws://... --tag cloud
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator

import jwt
import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    DataStreamAudioReceiver,
)

from appliance.auth import PUBLISH_ON_BEHALF
from appliance.dev.bench_bargein import ReferenceGenerator
from appliance.runtimes import AUDIO_SAMPLE_RATE

log = logging.getLogger("appliance.dev.remote_worker")

# the band a viewer looks for: saturated, far apart after VP8
TAGS = {"gpu": (0, 64, 255), "cloud": (255, 128, 0)}
BAND_ROWS = 24
SIZE = 464  # below ~480 px AvatarRunner's default publish options keep one simulcast layer


def tag_of(image: np.ndarray) -> str | None:
    """Which rung's band is on top of ``image`` (RGB), if any."""
    band = image[2: BAND_ROWS - 2].reshape(-1, 3).mean(axis=0)
    for name, colour in TAGS.items():
        if np.abs(band - np.array(colour)).max() < 48:
            return name
    return None


class TaggedGenerator(ReferenceGenerator):
    def __init__(self, options: AvatarOptions, tag: str, on_speech: asyncio.Event) -> None:
        super().__init__(options)
        self._colour = np.array(TAGS[tag], np.uint8)
        self._on_speech = on_speech
        self.last_speech = time.monotonic()

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if not isinstance(frame, AudioSegmentEnd):
            self._on_speech.set()
            self.last_speech = time.monotonic()
        await super().push_audio(frame)

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        """Pictures always, voice only while speaking: as livekit-plugins-bithuman's generator
        (the SDK's idle frames carry no audio chunk). AvatarRunner counts every audio frame it
        forwards as played, so idle silence would count as playback."""
        opts = self._options
        async for frame in self._runtime.frames():
            image = frame.image.copy()
            image[:BAND_ROWS] = self._colour
            yield rtc.VideoFrame(opts.video_width, opts.video_height, rtc.VideoBufferType.RGB24, image.tobytes())
            if frame.speaking:
                yield rtc.AudioFrame(frame.audio.tobytes(), AUDIO_SAMPLE_RATE, 1, len(frame.audio))
            if frame.end_of_speech and self._segment_open:
                self._segment_open = False
                yield AudioSegmentEnd()


def _sender(room: rtc.Room, claims: dict[str, object]) -> str | None:
    attributes = claims.get("attributes") or {}
    pinned = attributes.get(PUBLISH_ON_BEHALF) if isinstance(attributes, dict) else None
    if pinned:
        return str(pinned)
    agents = [p for p in room.remote_participants.values() if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT]
    return agents[0].identity if agents else None


async def serve(url: str, token: str, tag: str, crash_after_s: float, idle_timeout_s: float) -> str:
    """Until the session ends; returns why."""
    claims = jwt.decode(token, options={"verify_signature": False})
    room = rtc.Room()
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def end(why: str) -> None:
        if not ended.done():
            ended.set_result(why)

    def on_left(participant: rtc.RemoteParticipant) -> None:
        if not any(p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
                   for p in room.remote_participants.values()):
            end("the last user left")

    room.on("disconnected", lambda reason=None: end(f"disconnected ({reason})"))
    room.on("participant_disconnected", on_left)
    await room.connect(url, token, rtc.RoomOptions(connect_timeout=10))
    options = AvatarOptions(video_width=SIZE, video_height=SIZE, video_fps=25.0,
                            audio_sample_rate=AUDIO_SAMPLE_RATE, audio_channels=1)
    spoke = asyncio.Event()
    generator = TaggedGenerator(options, tag, spoke)
    await generator.open()
    sender = _sender(room, claims)
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room, sender_identity=sender),
                          video_gen=generator, options=options)
    await runner.start()
    print(f"remote worker {room.local_participant.identity} ({tag}) serving {sender}", flush=True)

    async def faults() -> None:
        if crash_after_s > 0:
            await spoke.wait()
            await asyncio.sleep(crash_after_s)
            print("remote worker: crashing (fault injected)", flush=True)
            os._exit(3)
        while idle_timeout_s > 0:
            await asyncio.sleep(0.5)
            if time.monotonic() - generator.last_speech > idle_timeout_s:
                end(f"idle for {idle_timeout_s:g} s")
                return

    injected = asyncio.create_task(faults())
    why = await ended
    injected.cancel()
    with contextlib.suppress(Exception):
        await runner.aclose()
    await room.disconnect()
    return why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.dev.remote_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--tag", choices=sorted(TAGS), required=True)
    parser.add_argument("--crash-after-s", type=float, default=0.0)
    parser.add_argument("--idle-timeout-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    token = os.environ.get("LIVEKIT_TOKEN", "")  # not in argv: ps shows argv to everyone
    if not token:
        parser.error("set LIVEKIT_TOKEN to the worker's join token")
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        why = asyncio.run(serve(args.url, token, args.tag, args.crash_after_s, args.idle_timeout_s))
        print(f"remote worker: session ended: {why}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # the native runtime can abort at interpreter exit after disconnect


if __name__ == "__main__":
    sys.exit(main())
