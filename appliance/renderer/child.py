"""The renderer child process: runs one avatar runtime, hands frames to the parent.

Started by ``renderer.py`` as ``python -P -m appliance.renderer.child --fd N``
(never forked: the parent runs native LiveKit threads). This module also
defines what both sides speak, so the parent imports it (it imports no native
avatar code at module level):

Handshake: ``Hello`` (imports done) → ``Init`` → ``Opening`` (at once: the child is
alive and took the job) → ``Ready`` (model open, ring created) → ``FrameReady``...
A child answers ``Ping`` with ``Pong`` while it waits for ``Init`` (an idle spare is
health-checked like any process: it can be stopped, OOM-killed or hung) and while it
renders.

Control channel (a unix socketpair, one message after another)::

    u32 length of the rest | u8 tag | u16 header length | header (JSON) | data (raw bytes)

Only ``PushAudio`` carries ``data``; everything else is the JSON header.
Secrets (``Init.api_secret``) travel only here, never in argv or the
environment.

Shared-memory ring (created by the child under the name the parent chose in
``Init``; the parent unlinks the name as soon as it has attached, so nothing
is left in /dev/shm whatever dies later)::

    slot i at i * slot_size:  u64 seq | u32 flags | u32 n_samples | pad to 64
                              | RGB image (h, w, 3) uint8 | int16 audio[audio_capacity]

The child sets ``seq = 0``, writes the slot, sets ``seq`` and then sends
``FrameReady(slot, seq)``. The parent copies the slot and checks ``seq``
before and after the copy; a slot that changed underneath it is dropped.
A slot can only change underneath the parent when it lags a whole ring
behind, which the parent avoids by dropping the oldest notifications first.
(On weakly ordered CPUs (ARM64) there is no explicit barrier between the
image stores and the ``seq`` store; the send/recv system calls between
writing and reading act as one, except in that lapped case.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any, ClassVar

import numpy as np

from appliance.runtimes import Frame, Runtime, RuntimeFailure, create_runtime

__all__ = [
    "Message",
    "Hello",
    "Init",
    "PushAudio",
    "Flush",
    "Interrupt",
    "Ping",
    "Shutdown",
    "Opening",
    "Ready",
    "FrameReady",
    "Pong",
    "Failure",
    "encode",
    "read_message",
    "RingLayout",
    "Ring",
    "open_shm",
    "unlink_shm",
    "sweep_stale_segments",
    "SHM_PREFIX",
    "main",
]

log = logging.getLogger("appliance.renderer.child")

# ---------------------------------------------------------------------------- messages


@dataclass
class Message:
    tag: ClassVar[int] = 0


@dataclass
class Hello(Message):  # child → parent: interpreter and runtime imports are ready
    tag: ClassVar[int] = 1
    pid: int


@dataclass
class Init(Message):  # parent → child: open this model, write frames into this ring
    tag: ClassVar[int] = 2
    runtime: str
    model: str
    width: int
    height: int
    shm_name: str
    slots: int
    api_secret: str | None = field(default=None, repr=False)


@dataclass
class PushAudio(Message):
    tag: ClassVar[int] = 3
    sample_rate: int
    last_chunk: bool = False
    data: bytes = field(default=b"", repr=False)


@dataclass
class Flush(Message):
    tag: ClassVar[int] = 4


@dataclass
class Interrupt(Message):
    """Parent → child: barge-in. Child → parent, once the runtime dropped its speech: every
    ``FrameReady`` before this echo may carry cancelled speech, none after it does."""

    tag: ClassVar[int] = 5


@dataclass
class Ping(Message):
    tag: ClassVar[int] = 6
    seq: int


@dataclass
class Shutdown(Message):
    tag: ClassVar[int] = 7


@dataclass
class Ready(Message):  # child → parent: model open, ring created
    tag: ClassVar[int] = 8
    width: int
    height: int
    fps: float
    audio_capacity: int
    slots: int
    shm_name: str


@dataclass
class FrameReady(Message):
    tag: ClassVar[int] = 9
    slot: int
    seq: int


@dataclass
class Pong(Message):
    tag: ClassVar[int] = 10
    seq: int


@dataclass
class Failure(Message):
    """Child → parent: cannot serve. ``kind``: a RuntimeFailure class name, or "crash"."""

    tag: ClassVar[int] = 11
    kind: str
    message: str
    setting: str = ""
    fix: str = ""


@dataclass
class Opening(Message):  # child → parent: Init received, opening the model now
    tag: ClassVar[int] = 12
    pid: int


_BY_TAG: dict[int, type[Message]] = {
    cls.tag: cls
    for cls in (
        Hello,
        Init,
        PushAudio,
        Flush,
        Interrupt,
        Ping,
        Shutdown,
        Ready,
        FrameReady,
        Pong,
        Failure,
        Opening,
    )
}
_PREFIX = struct.Struct("<IBH")  # length of the rest, tag, header length
MAX_MESSAGE = 16 << 20


def encode(msg: Message) -> bytes:
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "data"}
    header = json.dumps(fields, separators=(",", ":")).encode()
    data: bytes = getattr(msg, "data", b"")
    return _PREFIX.pack(3 + len(header) + len(data), msg.tag, len(header)) + header + data


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at end of stream (the other side is gone)."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
        length, tag, header_len = _PREFIX.unpack(prefix)
        if length > MAX_MESSAGE or header_len > length - 3 or tag not in _BY_TAG:
            raise ValueError(f"bad message prefix: length={length} tag={tag} header={header_len}")
        body = await reader.readexactly(length - 3)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    fields: dict[str, Any] = json.loads(body[:header_len])
    if length - 3 > header_len:
        fields["data"] = body[header_len:]
    return _BY_TAG[tag](**fields)


# ---------------------------------------------------------------------------- shared memory


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    # Python < 3.13 registers every SharedMemory with a resource-tracker process
    # (spawned on first use, one per process) that unlinks it at exit and warns.
    # We own the segment's lifetime ourselves, so keep it out: swap the tracker
    # that shared_memory sees (only that module's global) for a no-op meanwhile.
    real = shared_memory.resource_tracker  # type: ignore[attr-defined]

    class _NoTracker:
        @staticmethod
        def register(name: str, rtype: str) -> None:
            pass

        unregister = register

    shared_memory.resource_tracker = _NoTracker  # type: ignore[attr-defined]
    try:
        yield
    finally:
        shared_memory.resource_tracker = real  # type: ignore[attr-defined]


SHM_PREFIX = "appliance-r-"  # every ring segment's name starts with this


def open_shm(name: str, size: int = 0) -> shared_memory.SharedMemory:
    """Create (``size > 0``) or attach a POSIX shared-memory segment nobody else will unlink."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, create=size > 0, size=size, track=False)  # type: ignore[call-arg]
    with _untracked():
        return shared_memory.SharedMemory(name, create=size > 0, size=size)


def unlink_shm(name: str) -> bool:
    """Remove the segment's name if it still exists; True if it did."""
    try:
        shm = open_shm(name)
    except FileNotFoundError:
        return False
    with _untracked():
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            return False
    return True


def sweep_stale_segments() -> list[str]:
    """Unlink ring segments left by a supervisor that died between a child's Init and Ready."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            m = re.fullmatch(re.escape(SHM_PREFIX) + r".*-(\d+)-\d+", entry.name)
            if m and not _pid_alive(int(m.group(1))) and unlink_shm(entry.name):
                removed.append(entry.name)
    if removed:
        log.warning("removed stale shared memory left by a dead supervisor: %s", ", ".join(removed))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HEADER = 64
_SPEAKING, _END_OF_SPEECH = 1, 2


@dataclass(frozen=True)
class RingLayout:
    width: int
    height: int
    audio_capacity: int  # int16 samples per slot
    slots: int

    @property
    def image_bytes(self) -> int:
        return self.width * self.height * 3

    @property
    def slot_size(self) -> int:
        raw = _HEADER + self.image_bytes + 2 * self.audio_capacity
        return (raw + 63) // 64 * 64

    @property
    def size(self) -> int:
        return self.slots * self.slot_size


class Ring:
    """Numpy views onto the slots of one shared-memory segment."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: RingLayout) -> None:
        if shm.size < layout.size:
            raise ValueError(f"shared memory {shm.name} has {shm.size} bytes, needs {layout.size}")
        self.shm, self.layout = shm, layout
        buf = shm.buf
        assert buf is not None
        self._seq: list[np.ndarray] = []
        self._meta: list[np.ndarray] = []
        self._image: list[np.ndarray] = []
        self._audio: list[np.ndarray] = []
        h, w, cap = layout.height, layout.width, layout.audio_capacity
        for i in range(layout.slots):
            base = i * layout.slot_size
            self._seq.append(np.frombuffer(buf, np.uint64, 1, base))
            self._meta.append(np.frombuffer(buf, np.uint32, 2, base + 8))
            self._image.append(
                np.frombuffer(buf, np.uint8, h * w * 3, base + _HEADER).reshape(h, w, 3)
            )
            self._audio.append(
                np.frombuffer(buf, np.int16, cap, base + _HEADER + layout.image_bytes)
            )

    def write(self, slot: int, seq: int, frame: Frame) -> None:
        self._seq[slot][0] = 0
        n = min(len(frame.audio), self.layout.audio_capacity)
        self._meta[slot][:] = (_SPEAKING * frame.speaking | _END_OF_SPEECH * frame.end_of_speech, n)
        np.copyto(self._image[slot], frame.image)
        self._audio[slot][:n] = frame.audio[:n]
        self._seq[slot][0] = seq

    def read(self, slot: int, seq: int) -> Frame | None:
        """A copy of the slot's frame, or None if the slot no longer holds frame ``seq``."""
        seq_view = self._seq[slot]
        if seq_view[0] != seq:
            return None
        flags, n = (int(x) for x in self._meta[slot])
        image = self._image[slot].copy()
        audio = self._audio[slot][: min(n, self.layout.audio_capacity)].copy()
        if seq_view[0] != seq:
            return None
        return Frame(
            image,
            audio,
            speaking=bool(flags & _SPEAKING),
            end_of_speech=bool(flags & _END_OF_SPEECH),
        )

    def close(self) -> None:
        for views in (self._seq, self._meta, self._image, self._audio):
            views.clear()
        try:
            self.shm.close()
        except BufferError:  # a view escaped somewhere; the mapping goes when it is collected
            log.warning("shared memory %s still referenced at close", self.shm.name)


# ---------------------------------------------------------------------------- the child


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


def _die_with_parent(parent_pid: int) -> None:
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
    _die_with_parent(args.parent_pid)
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
