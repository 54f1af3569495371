"""The renderer child process: runs one avatar runtime, hands frames to the parent.

Started by ``renderer.py`` as ``python -P -m appliance.renderer.child --fd N``
(never forked: the parent runs native LiveKit threads). It speaks
``protocol.py`` on its control socket and writes frames into ``ring.py``; it
imports no native avatar code until ``Init`` (or ``--preload``) names a runtime.
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

from appliance.renderer.protocol import (
    Failure,
    Flush,
    FrameReady,
    Hello,
    Init,
    Interrupt,
    Message,
    Opening,
    Ping,
    Pong,
    PushAudio,
    Ready,
    Shutdown,
    encode,
    read_message,
)
from appliance.renderer.ring import Ring, RingLayout, open_shm, unlink_shm
from appliance.runtimes import Runtime, RuntimeFailure, create_runtime

__all__ = ["main", "die_with_parent"]

log = logging.getLogger("appliance.renderer.child")

def _make_runtime(spec: str, width: int, height: int, api_secret: str | None) -> Runtime:
    # "module:factory" loads a runtime that is not built in (tests, experiments);
    # config only ever passes the names in runtime.RUNTIME_NAMES.
    if ":" in spec:
        import importlib

        module, attr = spec.split(":", 1)
        factory = getattr(importlib.import_module(module), attr)
        return factory(width=width, height=height, api_secret=api_secret)  # type: ignore[no-any-return]
    return create_runtime(spec, width=width, height=height, api_secret=api_secret)


class _Child:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, msg: Message) -> None:
        self.writer.write(encode(msg))

    async def serve(self, preload: str) -> int:
        if preload:  # a spare child pays for the runtime's imports before anyone waits for it
            try:
                _make_runtime(preload, 16, 16, None)
            except Exception as e:
                log.debug("preload of %s failed: %s", preload, e)
        self.send(Hello(pid=os.getpid()))
        msg = await self._wait_for_init()
        if msg is None:
            return 0  # parent gone or Shutdown before Init: a spare that was not needed
        self.send(Opening(pid=os.getpid()))
        try:
            runtime = _make_runtime(msg.runtime, msg.width, msg.height, msg.api_secret)
            await runtime.open(msg.model)
            video = runtime.video
        except RuntimeFailure as e:
            log.error("cannot open model: %s", e.operator_line())
            self.send(Failure(type(e).__name__, str(e), e.setting, e.fix))
            await self.writer.drain()
            return 3
        except Exception as e:
            log.exception("runtime crashed while opening %s", msg.model)
            self.send(Failure("crash", f"{type(e).__name__}: {e}"))
            await self.writer.drain()
            return 1
        layout = RingLayout(video.width, video.height, 2 * video.samples_per_frame, msg.slots)
        ring = Ring(open_shm(msg.shm_name, layout.size), layout)
        try:
            self.send(
                Ready(
                    video.width,
                    video.height,
                    video.fps,
                    layout.audio_capacity,
                    msg.slots,
                    msg.shm_name,
                )
            )
            return await self._run(runtime, ring)
        finally:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(runtime.close(), 2.0)
            ring.close()
            unlink_shm(msg.shm_name)  # normally the parent already did

    async def _wait_for_init(self) -> Init | None:
        """An idle spare: answer pings (the parent's proof that we are alive) until Init."""
        while True:
            msg = await read_message(self.reader)
            if isinstance(msg, Init):
                return msg
            if msg is None or isinstance(msg, Shutdown):
                return None
            if isinstance(msg, Ping):
                self.send(Pong(msg.seq))
            else:
                log.warning("unexpected message before Init: %s", type(msg).__name__)

    async def _run(self, runtime: Runtime, ring: Ring) -> int:
        pump = asyncio.create_task(self._pump(runtime, ring), name="pump")
        control = asyncio.create_task(self._control(runtime), name="control")
        done, _ = await asyncio.wait({pump, control}, return_when=asyncio.FIRST_COMPLETED)
        for task in (pump, control):
            task.cancel()
        await asyncio.gather(pump, control, return_exceptions=True)
        if pump in done:
            exc = pump.exception() if not pump.cancelled() else None
            if isinstance(exc, RuntimeFailure):
                self.send(Failure(type(exc).__name__, str(exc), exc.setting, exc.fix))
            else:
                why = f"{type(exc).__name__}: {exc}" if exc else "runtime.frames() ended"
                log.error("frame loop stopped: %s", why, exc_info=exc)
                self.send(Failure("crash", why))
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
            return 1
        return 0

    async def _pump(self, runtime: Runtime, ring: Ring) -> None:
        slots, seq = ring.layout.slots, 0
        async for frame in runtime.frames():
            seq += 1
            slot = seq % slots
            ring.write(slot, seq, frame)
            self.send(FrameReady(slot, seq))
            await self.writer.drain()

    async def _control(self, runtime: Runtime) -> None:
        while True:
            msg = await read_message(self.reader)
            if msg is None or isinstance(msg, Shutdown):
                return
            if isinstance(msg, PushAudio):
                await runtime.push_audio(msg.data, msg.sample_rate, msg.last_chunk)
            elif isinstance(msg, Flush):
                await runtime.flush()
            elif isinstance(msg, Interrupt):
                await runtime.interrupt()
                self.send(Interrupt())
            elif isinstance(msg, Ping):
                self.send(Pong(msg.seq))
            else:
                log.warning("unexpected message %s", type(msg).__name__)


def die_with_parent(parent_pid: int) -> None:
    # If the supervisor is killed outright, take this child with it (Linux only).
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)


async def _amain(fd: int, preload: str) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        return await _Child(reader, writer).serve(preload)
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="appliance.renderer.child")
    p.add_argument("--fd", type=int, required=True, help="control socket inherited from the parent")
    p.add_argument("--name", default="renderer")
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--preload", default="", help="runtime whose imports to load before Init")
    args = p.parse_args(argv)
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=f"renderer-child[{args.name}:%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_amain(args.fd, args.preload))


if __name__ == "__main__":
    sys.exit(main())
