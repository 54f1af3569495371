"""One renderer child process and its control channel, seen from the supervisor.

It spawns nothing itself (``renderer.py`` does); it reads the child's messages,
notices its exit at once (pidfd), attaches the shared-memory ring after
``Ready``, and retires it in bounded time: ask, dump stacks, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from appliance.renderer.protocol import (
    Failure,
    FrameReady,
    Hello,
    Interrupt,
    Message,
    Opening,
    Pong,
    Ready,
    Shutdown,
    encode,
    read_message,
)
from appliance.renderer.ring import Ring, RingLayout, open_shm, unlink_shm

__all__ = ["ChildProcess", "exit_reason"]

log = logging.getLogger("appliance.renderer")


def exit_reason(returncode: int | None) -> str:
    if returncode is None:
        return "child closed its control channel"
    if returncode < 0:
        try:
            return f"child killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"child killed by signal {-returncode}"
    return f"child exited with code {returncode}"


class ChildProcess:
    """One child process and its control channel, parent side."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, shm_name: str) -> None:
        self.proc, self.pid, self.shm_name = proc, proc.pid, shm_name
        self.spawned_at = time.monotonic()
        self.hello_at: float | None = None
        self.opening_at: float | None = None
        self.last_ping = 0.0
        self.promoted = False  # was an idle spare before it was given the job
        self.ready: Ready | None = None
        self.ring: Ring | None = None
        self.failure: Failure | None = None
        self.frames = 0
        self.last_frame = 0.0
        self.last_seq = 0
        # barge-in: interrupts the child has not echoed yet, and the last frame rendered
        # before the latest echo (speech in frames up to it was cancelled)
        self.interrupts_unacked = 0
        self.cancelled_upto = 0
        self.first_frame_at: float | None = None
        self.last_pong = 0.0
        self.running_since: float | None = None
        self.eof = False
        self.exited = asyncio.Event()
        self.wakeup = asyncio.Event()
        self.on_frame: Callable[[ChildProcess, int, int], None] | None = None
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pidfd = -1

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._tasks.append(
            asyncio.create_task(self._read_loop(reader), name=f"renderer-read-{self.pid}")
        )
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
            loop.add_reader(self._pidfd, self._check_exit)
        except (OSError, AttributeError):  # no pidfd (old kernel): poll
            self._tasks.append(
                asyncio.create_task(self._poll_exit(), name=f"renderer-poll-{self.pid}")
            )

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def silent_for(self, now: float) -> float:
        """Seconds since the child last proved it is alive (Hello or Pong)."""
        return now - max(self.last_pong, self.hello_at or self.spawned_at)

    def send(self, msg: Message) -> bool:
        if self._writer is None or self.eof or self._writer.is_closing():
            return False
        self._writer.write(encode(msg))
        return True

    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
    # arrives as the event fires, and close() then waits for the supervision task forever
    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                await self.wakeup.wait()
        self.wakeup.clear()

    async def wait_exit(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.exited.wait()
        return self.exited.is_set()

    def _check_exit(self) -> None:
        if self.proc.poll() is None:
            return
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self.exited.set()
        self.wakeup.set()

    async def _poll_exit(self) -> None:
        while self.alive:
            self._check_exit()
            await asyncio.sleep(0.1)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while (msg := await read_message(reader)) is not None:
                if isinstance(msg, FrameReady):  # the hot path
                    self.frames += 1
                    self.last_frame = time.monotonic()
                    self.last_seq = msg.seq
                    if self.on_frame is not None:
                        self.on_frame(self, msg.slot, msg.seq)
                    if self.frames > 1:
                        continue
                    self.first_frame_at = self.last_frame
                elif isinstance(msg, Pong):
                    self.last_pong = time.monotonic()
                    continue
                elif isinstance(msg, Interrupt):  # the echo: the runtime dropped its speech
                    self.interrupts_unacked = max(0, self.interrupts_unacked - 1)
                    if not self.interrupts_unacked:
                        self.cancelled_upto = self.last_seq
                    continue
                elif isinstance(msg, Hello):
                    self.hello_at = time.monotonic()
                elif isinstance(msg, Opening):
                    self.opening_at = time.monotonic()
                elif isinstance(msg, Ready):
                    self._attach(msg)
                elif isinstance(msg, Failure):
                    self.failure = msg
                else:
                    log.warning("child %d sent unexpected %s", self.pid, type(msg).__name__)
                self.wakeup.set()
        except Exception:
            log.exception("child %d: bad message on the control channel", self.pid)
        finally:
            self.eof = True
            self.wakeup.set()

    def speech_cancelled(self, seq: int) -> bool:
        """Frame ``seq`` was rendered before the runtime applied the latest interrupt."""
        return self.interrupts_unacked > 0 or seq <= self.cancelled_upto

    def _attach(self, msg: Ready) -> None:
        if msg.shm_name != self.shm_name:
            raise ValueError(
                f"child used shared memory {msg.shm_name!r}, asked for {self.shm_name!r}"
            )
        layout = RingLayout(msg.width, msg.height, msg.audio_capacity, msg.slots)
        self.ring = Ring(open_shm(msg.shm_name), layout)
        unlink_shm(msg.shm_name)  # both sides hold it now; nothing can leak it from here on
        self.ready = msg

    async def retire(self, *, grace_s: float, dump: bool) -> None:
        """Ask, dump stacks, kill; then release everything. Bounded time."""
        if self.alive and self.send(Shutdown()):
            await self.wait_exit(grace_s)
        if self.alive:
            if dump:
                log.warning(
                    "child %d did not stop when asked; dumping its stacks, then SIGKILL", self.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGUSR1)
                await self.wait_exit(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            if not await self.wait_exit(5.0):
                log.error("child %d survived SIGKILL for 5 s", self.pid)
        self.close()

    def close(self) -> None:
        self.on_frame = None
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        unlink_shm(self.shm_name)  # in case the child created it and died before Ready
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
