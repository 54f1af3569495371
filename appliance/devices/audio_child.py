"""The audio child: speaker, microphone, echo canceller and the visitor participant.

Started by ``audio_link.py`` as ``python -P -m appliance.devices.audio_child --fd N``.
Everything that can abort the process from native code (the APM on a wrongly
sized frame, PortAudio, a second libwebrtc) lives here, away from the
supervisor and the room's video::

    parent ─Play─► Speaker ──► device            (every block it writes → APM far end)
    device ─► Microphone ─► APM near end ─► AudioSource ─► visitor participant (SOURCE_MICROPHONE)

A device that cannot be opened is one problem line (setting, fix) and is
retried with backoff; the visitor participant rejoins forever with a fresh
token from the parent each time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import numpy as np

from appliance.devices.aec import EchoCanceller
from appliance.devices.audio import AudioDeviceError, AudioHost, Microphone, Speaker
from appliance.devices.audio_protocol import (
    KINDS,
    AudioHello,
    AudioInit,
    AudioStatus,
    Clear,
    Mute,
    NeedToken,
    Play,
    Stop,
    Token,
    Volume,
    encode,
    read_message,
)
from appliance.renderer.child import die_with_parent
from appliance.renderer.protocol import Message
from appliance.retry import Backoff
from appliance.runtimes import AUDIO_SAMPLE_RATE

__all__ = ["main"]

log = logging.getLogger("appliance.audio")

STATUS_PERIOD_S = 0.5


class _Child:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.init: AudioInit | None = None
        self.aec: EchoCanceller | None = None
        self.host = AudioHost()
        self.speaker: Speaker | None = None
        self.microphone: Microphone | None = None
        self.problems: dict[str, dict[str, str]] = {}  # setting → problem
        self.attempts: dict[str, int] = {}  # setting → failed opens so far
        self.muted = False
        self.visitor_state = "off"
        self.visitor_reason = ""
        self.frames_published = 0
        self._source: Any = None  # rtc.AudioSource of the current connection
        self._track: Any = None
        self._token: asyncio.Future[Token] | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def send(self, msg: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(msg))

    # -- messages from the parent -----------------------------------------------------

    async def serve(self) -> int:
        self.send(AudioHello(pid=os.getpid()))
        while (msg := await read_message(self.reader, KINDS)) is not None:
            if isinstance(msg, Play):
                if self.speaker is not None:
                    self.speaker.play(np.frombuffer(msg.data, np.int16))
            elif isinstance(msg, Clear):  # barge-in: the voice stops here too
                if self.speaker is not None:
                    self.speaker.clear()
            elif isinstance(msg, Mute):
                self._set_muted(msg.muted)
            elif isinstance(msg, Volume):
                if self.speaker is not None:
                    self.speaker.volume = msg.volume
            elif isinstance(msg, Token):
                if self._token is not None and not self._token.done():
                    self._token.set_result(msg)
            elif isinstance(msg, AudioInit) and self.init is None:
                self._start(msg)
            elif isinstance(msg, Stop):
                break
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._close_devices)
        return 0

    def _start(self, init: AudioInit) -> None:
        self.init, self.muted = init, init.muted
        self.aec = EchoCanceller(echo_cancellation=init.echo_cancellation,
                                 noise_suppression=init.noise_suppression)
        spawn = lambda coro, name: self._tasks.append(asyncio.create_task(coro, name=name))  # noqa: E731
        spawn(self._report(), "status")
        if init.speaker.strip():
            spawn(self._open_device("[audio] speaker", init.speaker), "speaker")
        if init.microphone.strip():
            spawn(self._open_device("[audio] microphone", init.microphone), "microphone")
        if init.url:
            spawn(self._visitor(), "visitor")

    # -- devices: open with backoff until they work --------------------------------------

    async def _open_device(self, setting: str, name: str) -> None:
        assert self.init is not None and self.aec is not None
        backoff = Backoff(first_s=1.0, max_s=30.0, jitter=0.2)
        loop = asyncio.get_running_loop()
        while True:
            try:
                if setting.endswith("speaker"):
                    speaker = await asyncio.to_thread(Speaker.open, name, self.init.volume, self.host)
                    speaker.on_played = self.aec.far_end
                    self.speaker = speaker
                else:
                    microphone = await asyncio.to_thread(Microphone.open, name, loop, self.host)
                    microphone.process = self._near_end
                    self.microphone = microphone
                    self._tasks.append(asyncio.create_task(self._capture(microphone), name="capture"))
                self.problems.pop(setting, None)
                return
            except AudioDeviceError as exc:
                self.attempts[setting] = self.attempts.get(setting, 0) + 1
                delay = backoff.next_delay()
                if setting not in self.problems:
                    log.error("%s — retrying with backoff", exc.operator_line())
                self.problems[setting] = {"setting": setting, "message": str(exc), "fix": exc.fix}
                await asyncio.sleep(delay)

    def _near_end(self, samples: np.ndarray, input_latency_s: float) -> np.ndarray:
        """On the microphone thread: delay = speaker queue + output + input latency."""
        assert self.aec is not None
        speaker = self.speaker
        delay_s = input_latency_s + (speaker.delay_s() if speaker is not None else 0.0)
        return self.aec.near_end(samples, 1000 * delay_s)

    async def _capture(self, microphone: Microphone) -> None:
        async for frame in microphone:
            source = self._source
            if source is None or self.muted:
                continue  # muted: nothing leaves the kiosk (the canceller keeps adapting)
            with contextlib.suppress(Exception):  # a connection closing under us
                await source.capture_frame(frame)
                self.frames_published += 1

    def _set_muted(self, muted: bool) -> None:
        if muted != self.muted:
            log.info("visitor microphone %s", "muted" if muted else "live")
        self.muted = muted
        track = self._track
        if track is not None:
            track.mute() if muted else track.unmute()

    def _device_problems(self) -> list[dict[str, str]]:
        out = list(self.problems.values())
        for setting, part in (("[audio] speaker", self.speaker), ("[audio] microphone", self.microphone)):
            if part is not None and part.lost_since is not None:
                out.append({"setting": setting, "fix": "check its cable; it is reopened with backoff",
                            "message": f"{part.device_name!r} stopped working "
                                       f"{time.monotonic() - part.lost_since:.0f} s ago"})
        return out

    def _close_devices(self) -> None:
        for part in (self.speaker, self.microphone):
            if part is not None:
                part.close()
        self.host.close()

    # -- the visitor participant -------------------------------------------------------

    async def _visitor(self) -> None:
        from livekit import rtc

        assert self.init is not None
        init = self.init
        backoff = Backoff(first_s=0.5, max_s=init.retry_max_s, jitter=0.2)
        fresh = False
        while not self._stop.is_set():
            room = rtc.Room()
            gone = asyncio.Event()
            room.on("disconnected", lambda *_, gone=gone: gone.set())
            room.on("reconnecting", lambda: self._visitor_state("reconnecting", "connection lost"))
            room.on("reconnected", lambda: self._visitor_state("live", f"room {init.room} (resumed)"))
            try:
                self._visitor_state("connecting", init.url)
                token = await self._ask_token(fresh)
                options = rtc.RoomOptions(auto_subscribe=False, connect_timeout=init.connect_timeout_s)
                await room.connect(init.url, token, options)
                if init.microphone.strip():
                    source = rtc.AudioSource(AUDIO_SAMPLE_RATE, 1)
                    track = rtc.LocalAudioTrack.create_audio_track("visitor-microphone", source)
                    publish = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
                    await room.local_participant.publish_track(track, publish)
                    if self.muted:
                        track.mute()
                    self._source, self._track = source, track
                backoff.reset()
                fresh = False
                self._visitor_state("live", f"room {init.room}")
                await gone.wait()
                reason = "the server closed the connection or the SDK gave up"
            except asyncio.CancelledError:
                await self._leave(room)
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                fresh = True  # a refused or stale token: ask for a fresh one
            await self._leave(room)
            delay = backoff.next_delay()
            self._visitor_state("waiting", f"{reason}; retry in {delay:.0f} s")
            await asyncio.sleep(delay)

    async def _ask_token(self, fresh: bool) -> str:
        self._token = asyncio.get_running_loop().create_future()
        self.send(NeedToken(fresh=fresh))
        answer = await asyncio.wait_for(self._token, 30)
        if answer.error:
            raise RuntimeError(answer.error)
        return answer.token

    async def _leave(self, room: Any) -> None:
        self._source = self._track = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(room.disconnect(), 5)

    def _visitor_state(self, state: str, reason: str) -> None:
        if (state, reason) != (self.visitor_state, self.visitor_reason):
            log.info("visitor %s → %s (%s)", self.visitor_state, state, reason)
        self.visitor_state, self.visitor_reason = state, reason

    # -- status: the heartbeat -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        aec = self.aec
        cpu = os.times()
        return {
            "pid": os.getpid(),
            "cpu_s": cpu.user + cpu.system,
            "speaker": self.speaker.stats() if self.speaker else None,
            "microphone": dict(self.microphone.stats(), muted=self.muted) if self.microphone else None,
            "muted": self.muted,
            "echo_canceller": aec.stats() if aec else None,
            "visitor": {"state": self.visitor_state, "reason": self.visitor_reason,
                        "identity": self.init.identity if self.init else "",
                        "frames_published": self.frames_published},
            "attempts": dict(self.attempts),
        }

    async def _report(self) -> None:
        while True:
            self.send(AudioStatus(status=self.status(), problems=self._device_problems()))
            await asyncio.sleep(STATUS_PERIOD_S)


async def _amain(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    return await _Child(reader, writer).serve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance.devices.audio_child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)  # a supervisor killed outright takes its audio with it
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="audio-child %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1)  # the parent asks for stacks before a kill
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal: the parent decides
    return asyncio.run(_amain(args.fd))


if __name__ == "__main__":
    sys.exit(main())
