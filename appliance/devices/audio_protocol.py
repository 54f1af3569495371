"""What the supervisor and the audio child say to each other (both sides import it).

Same framing as the renderer's control channel (``renderer/protocol.py``):
``u32 length | u8 tag | u16 header length | JSON header | raw data``.

    child  → parent  AudioHello, then AudioStatus every 0.5 s (the heartbeat), NeedToken
    parent → child   AudioInit, Token, Play (16 kHz int16 in data), Clear, Mute, Volume, Stop

The join token travels only here, never in argv or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from appliance.renderer.protocol import Message, encode, read_message

__all__ = [
    "AudioHello", "AudioInit", "Token", "NeedToken", "Play", "Clear", "Mute", "Volume", "Stop",
    "AudioStatus", "KINDS", "encode", "read_message",
]


@dataclass
class AudioHello(Message):
    tag: ClassVar[int] = 101
    pid: int


@dataclass
class AudioInit(Message):
    tag: ClassVar[int] = 102
    speaker: str
    microphone: str
    volume: float
    echo_cancellation: bool
    noise_suppression: bool
    muted: bool
    url: str = ""  # empty: no visitor participant (no way to get a token)
    room: str = ""
    identity: str = ""
    connect_timeout_s: float = 10.0
    retry_max_s: float = 10.0


@dataclass
class Token(Message):
    tag: ClassVar[int] = 103
    token: str = field(default="", repr=False)
    error: str = ""  # no token: why (an operator line)


@dataclass
class NeedToken(Message):
    tag: ClassVar[int] = 104
    fresh: bool = False  # the last one was refused or the connection failed


@dataclass
class Play(Message):
    tag: ClassVar[int] = 105
    data: bytes = field(default=b"", repr=False)


@dataclass
class Clear(Message):
    tag: ClassVar[int] = 106


@dataclass
class Mute(Message):
    tag: ClassVar[int] = 107
    muted: bool


@dataclass
class Volume(Message):
    tag: ClassVar[int] = 108
    volume: float


@dataclass
class Stop(Message):
    tag: ClassVar[int] = 109


@dataclass
class AudioStatus(Message):
    tag: ClassVar[int] = 110
    status: dict[str, Any]
    # open problems: [{"setting", "message", "fix"}], replaced as a whole each time
    problems: list[dict[str, str]] = field(default_factory=list)


KINDS: dict[int, type[Message]] = {
    cls.tag: cls
    for cls in (AudioHello, AudioInit, Token, NeedToken, Play, Clear, Mute, Volume, Stop, AudioStatus)
}
