"""What the supervisor and a renderer child say to each other (both sides import it).

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
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "Message", "Hello", "Init", "PushAudio", "Flush", "Interrupt", "Ping", "Shutdown", "Opening",
    "Ready", "FrameReady", "Pong", "Failure", "encode", "read_message",
]



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


async def read_message(reader: asyncio.StreamReader,
                       kinds: dict[int, type[Message]] | None = None) -> Message | None:
    """The next message, or None at end of stream (the other side is gone).

    ``kinds`` (tag → class) lets another channel reuse this framing
    (``devices/audio_protocol.py``); the default is the renderer's."""
    kinds = _BY_TAG if kinds is None else kinds
    try:
        prefix = await reader.readexactly(_PREFIX.size)
        length, tag, header_len = _PREFIX.unpack(prefix)
        if length > MAX_MESSAGE or header_len > length - 3 or tag not in kinds:
            raise ValueError(f"bad message prefix: length={length} tag={tag} header={header_len}")
        body = await reader.readexactly(length - 3)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    fields: dict[str, Any] = json.loads(body[:header_len])
    if length - 3 > header_len:
        fields["data"] = body[header_len:]
    return kinds[tag](**fields)
