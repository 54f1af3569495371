"""The audio child, seen from the supervisor: a frame sink that keeps it running.

    fan-out ─send_frame─► AudioLink ─Play─► audio child (speaker, mic, APM, visitor participant)
    barge-in ─drop_audio─►          ─Clear─►
    presence ─set_presence─►        ─Mute─►   ([audio] mic_when = "presence")

The child is spawned (``python -P -m appliance.devices.audio_child``), handed its
settings and, when it asks, a join token for the visitor identity, over a
socketpair. Its status messages are the heartbeat: a child that exits, aborts
(SIGABRT from native code), does not say hello within ``STARTUP_S`` (its imports
take seconds on a Pi, tens of seconds under emulation) or then falls silent for
``SILENT_S`` is killed and started again with backoff (immediate, then 1 s, 2 s … 30 s), and the room's
video never waits for it: frames for a dead child are simply dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from appliance.auth import TokenError, TokenSource
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
from appliance.renderer.process import exit_reason
from appliance.retry import Backoff
from appliance.runtimes import Frame
from appliance.status.problems import ProblemOwner

__all__ = ["AudioLink", "AudioSettings"]

log = logging.getLogger("appliance.audio")

SILENT_S = 10.0  # no status from the child for this long: it is hung (a starved CPU delays it seconds)
STARTUP_S = 60.0  # spawned and no hello for this long: it hangs while starting
HEALTHY_S = 30.0  # a child that ran this long starts the backoff over
MAX_QUEUED_BYTES = 64 * 1024  # ~2 s of audio waiting for a stuck child: drop instead
# The speaker and the microphone are real time: on a busy 2-core board a late read is a gap
# the visitor hears and a wrong echo path. The whole child runs SCHED_RR (its threads share
# one GIL, so real-time I/O threads alone would wait for an ordinary one: priority inversion);
# it needs ~5 % of a core, and the kernel keeps 5 % of every second for ordinary tasks.
# Its threads inherit the policy: it is set before the child starts any.
AUDIO_RT_PRIORITY = 10


@dataclass(frozen=True)
class AudioSettings:
    speaker: str
    microphone: str
    volume: float
    echo_cancellation: bool
    noise_suppression: bool
    mic_when: str  # "always" | "presence"
    url: str = ""
    room: str = ""
    identity: str = ""  # the visitor participant
    connect_timeout_s: float = 10.0
    retry_max_s: float = 10.0


class AudioLink:
    """Runs the audio child for as long as the kiosk runs."""

    def __init__(self, settings: AudioSettings, tokens: TokenSource | None,
                 problems: ProblemOwner | None = None) -> None:
        self.settings = settings
        self._tokens = tokens
        self._problems = problems
        self.state = "starting"
        self.restarts = 0
        self.last_exit = ""
        self.child_status: dict[str, Any] = {}
        self.present = settings.mic_when == "always"
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_status = 0.0
        self._said_hello = False  # the current child is up (its stack dump handler too)
        self._killed_why = ""  # why the watchdog killed the current child
        self._backoff = Backoff(first_s=1.0, max_s=30.0, immediate=True, jitter=0.2)
        self._stopping = False
        self._device_problems: list[dict[str, str]] = []
        self._fresh = True  # the first status of a new child replaces the restart problem
        self._said_no_rt = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- the frame sink ----------------------------------------------------------------

    async def send_frame(self, frame: Frame) -> None:
        if len(frame.audio):  # a hold frame in a speech hiccup has none
            self._send(Play(data=frame.audio.tobytes()), audio=True)

    def drop_audio(self) -> None:
        """Barge-in: the child's speaker queue is flushed too."""
        self._send(Clear())

    def set_presence(self, present: bool) -> None:
        """With mic_when = "presence", the visitor's track is live only while someone is there."""
        self.present = present or self.settings.mic_when == "always"
        self._send(Mute(muted=not self.present))

    def set_volume(self, volume: float) -> None:
        self._send(Volume(volume=volume))

    def _send(self, msg: Any, audio: bool = False) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        if audio and writer.transport.get_write_buffer_size() > MAX_QUEUED_BYTES:
            return  # the child is not reading: never let its backlog grow in the supervisor
        writer.write(encode(msg))

    # -- supervision ---------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a child running until close(); restart it with backoff when it dies or hangs."""
        while not self._stopping:
            started = time.monotonic()
            try:
                reason = await self._run_child()
            except OSError as exc:  # could not even spawn
                reason = f"cannot start the audio child: {exc}"
            if self._stopping:
                break
            if time.monotonic() - started >= HEALTHY_S:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            self.restarts += 1
            self.last_exit = reason
            self.state = "restarting"
            log.warning("audio child: %s — restarting it in %.0f s (the room keeps its video)",
                        reason, delay, extra={"reason": reason})
            if self._problems is not None:
                self._problems.report(f"the audio child stopped ({reason}); restarting in {delay:.0f} s",
                                      subject="audio child", setting="[audio]",
                                      fix="see the journal; the kiosk restarts it by itself")
            await asyncio.sleep(delay)
        self.state = "stopped"

    async def _run_child(self) -> str:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-P", "-m", "appliance.devices.audio_child",
                "--fd", str(child_sock.fileno()), "--parent-pid", str(os.getpid()),
                "--log-level", logging.getLevelName(logging.getLogger("appliance").getEffectiveLevel())]
        try:
            self._proc = subprocess.Popen(argv, pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL)
        finally:
            child_sock.close()
        try:  # needs CAP_SYS_NICE (the service runs as root); else ordinary scheduling
            os.sched_setscheduler(self._proc.pid, os.SCHED_RR, os.sched_param(AUDIO_RT_PRIORITY))
        except OSError as exc:  # e.g. the unit's RestrictRealtime=yes
            if not self._said_no_rt:
                log.info("audio child: ordinary scheduling, not SCHED_RR (%s)", exc)
                self._said_no_rt = True
        proc = self._proc
        self._fresh = True
        reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        self._last_status = time.monotonic()
        self._said_hello, self._killed_why = False, ""
        watchdog = asyncio.create_task(self._watch(proc), name="audio-child-watchdog")
        try:
            await self._serve(reader, writer)
        finally:
            self._writer = None
            watchdog.cancel()
            writer.close()
            await self._reap(proc)
        return self._killed_why or exit_reason(proc.returncode)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        while (msg := await read_message(reader, KINDS)) is not None:
            if isinstance(msg, AudioStatus):
                self._last_status = time.monotonic()
                self.child_status = msg.status
                self._update_problems(msg.problems)
            elif isinstance(msg, NeedToken):
                asyncio.create_task(self._give_token(writer, msg.fresh), name="visitor-token")
            elif isinstance(msg, AudioHello):
                writer.write(encode(AudioInit(
                    speaker=s.speaker, microphone=s.microphone, volume=s.volume,
                    echo_cancellation=s.echo_cancellation, noise_suppression=s.noise_suppression,
                    muted=not self.present, url=s.url if self._tokens else "", room=s.room,
                    identity=s.identity, connect_timeout_s=s.connect_timeout_s,
                    retry_max_s=s.retry_max_s)))
                self._writer = writer
                self._last_status, self._said_hello = time.monotonic(), True
                self.state = "running"
                log.info("audio child %d running", msg.pid)

    async def _give_token(self, writer: asyncio.StreamWriter, fresh: bool) -> None:
        assert self._tokens is not None
        if fresh:
            self._tokens.invalidate()
        try:
            answer = Token(token=await self._tokens.token())
        except TokenError as exc:
            answer = Token(error=exc.operator_line())
        if not writer.is_closing():
            writer.write(encode(answer))

    def _update_problems(self, problems: list[dict[str, str]]) -> None:
        if self._problems is None:
            return
        if problems != self._device_problems or self._fresh:
            self._device_problems, self._fresh = problems, False
            self._problems.replace((p["setting"], f"{p['setting']}: {p['message']}", p["setting"],
                                    p["fix"]) for p in problems)

    async def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill a child that stopped answering (a hung native call, SIGSTOP)."""
        while proc.poll() is None:
            await asyncio.sleep(0.5)
            limit = SILENT_S if self._said_hello else STARTUP_S
            if time.monotonic() - self._last_status > limit:
                if self._said_hello:  # its handler is registered: SIGUSR1 dumps, not kills
                    self._killed_why = f"silent for {SILENT_S:.0f} s"
                    log.warning("audio child %d silent for %.0f s: dumping its stacks, then SIGKILL",
                                proc.pid, SILENT_S)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGUSR1)
                    await asyncio.sleep(0.2)
                else:
                    self._killed_why = f"did not start within {STARTUP_S:.0f} s"
                    log.warning("audio child %d did not start within %.0f s: SIGKILL", proc.pid, STARTUP_S)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                return

    async def _reap(self, proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 5)

    async def close(self) -> None:
        """Ask the child to stop (it closes its devices and leaves the room), then kill it."""
        self._stopping = True
        writer, proc = self._writer, self._proc
        if writer is not None and not writer.is_closing():
            writer.write(encode(Stop()))
            with contextlib.suppress(Exception):
                await writer.drain()
        if proc is not None:
            await self._reap(proc, grace_s=5.0)
        if self._problems is not None:
            self._problems.clear()

    def status(self) -> dict[str, Any]:
        child = self.child_status
        microphone = child.get("microphone")
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit or None,
            "mic_when": self.settings.mic_when,
            "microphone": ("off" if not self.settings.microphone else
                           "muted" if child.get("muted", not self.present) else
                           "live" if microphone and not microphone.get("lost") else "unavailable"),
            "visitor": child.get("visitor"),
            "echo_canceller": child.get("echo_canceller"),
            "speaker_device": child.get("speaker"),
            "microphone_device": microphone,
            "cpu_s": child.get("cpu_s"),
            "attempts": child.get("attempts") or {},  # failed opens per device setting
        }
