"""The one interface between the supervisor and whatever renders the avatar.

A runtime opens a model, takes speech audio in, and yields video frames at
its own rate, each with the slice of audio that plays with it. It runs inside
the renderer child process (see ``renderer.py``); the supervisor never calls
it directly.

Exception tree::

    RuntimeFailure            the runtime cannot serve; ``.setting`` and ``.fix`` say what to change
    ├── ModelMissing          the model file does not exist or cannot be read
    ├── ModelInvalid          the file exists but is not a model this runtime can load
    ├── CredentialMissing     no secret was given (bithuman)
    ├── CredentialRefused     the service refused the secret or the account
    └── ServiceUnreachable    the credential service could not be reached
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from appliance.errors import OperatorError

__all__ = [
    "Frame",
    "VideoSpec",
    "Runtime",
    "RuntimeFailure",
    "ModelMissing",
    "ModelInvalid",
    "CredentialMissing",
    "CredentialRefused",
    "ServiceUnreachable",
    "AUDIO_SAMPLE_RATE",
    "RUNTIME_NAMES",
    "create_runtime",
]

# Audio leaves every runtime as 16 kHz mono int16: what bitHuman produces, and
# what the renderer's shared-memory slots are sized for.
AUDIO_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class VideoSpec:
    width: int
    height: int
    fps: float

    @property
    def samples_per_frame(self) -> int:
        return int(round(AUDIO_SAMPLE_RATE / self.fps))


@dataclass
class Frame:
    """One video frame and the audio that plays with it."""

    image: np.ndarray  # (height, width, 3) uint8, RGB
    audio: np.ndarray  # (samples_per_frame,) int16 mono at AUDIO_SAMPLE_RATE; zeros when silent
    speaking: bool = False  # audio slice carries speech (not idle silence)
    end_of_speech: bool = False  # the last frame of a reply (after flush)
    meta: dict[str, str] = field(default_factory=dict)


class RuntimeFailure(OperatorError):
    """The runtime cannot serve. The message is one line an operator can act on."""


class ModelMissing(RuntimeFailure):
    pass


class ModelInvalid(RuntimeFailure):
    pass


class CredentialMissing(RuntimeFailure):
    pass


class CredentialRefused(RuntimeFailure):
    pass


class ServiceUnreachable(RuntimeFailure):
    pass


class Runtime(abc.ABC):
    """Async interface; one instance renders one model.

    Usage::

        rt = SomeRuntime(...)
        await rt.open(model_path)           # may take ~20 s for a real .imx
        async for frame in rt.frames():     # runs forever at rt.video.fps, idle frames included
            ...
        # from other tasks: push_audio / flush / interrupt
        await rt.close()
    """

    name: str = "runtime"

    @property
    @abc.abstractmethod
    def video(self) -> VideoSpec:
        """Size and rate of the frames; valid after open()."""

    @abc.abstractmethod
    async def open(self, model_path: str) -> None:
        """Load the model. Raises a RuntimeFailure subclass with an operator message."""

    @abc.abstractmethod
    async def push_audio(self, pcm16: bytes, sample_rate: int, last_chunk: bool = False) -> None:
        """Queue speech (mono int16 little-endian) to be spoken."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """The current reply is complete: speak what is queued, then mark end_of_speech."""

    @abc.abstractmethod
    async def interrupt(self) -> None:
        """Barge-in: drop all queued speech now and return to idle."""

    @abc.abstractmethod
    def frames(self) -> AsyncIterator[Frame]:
        """Frames at the runtime's own rate, forever, idle frames when nothing is spoken."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the model and native resources."""


RUNTIME_NAMES = ("reference", "bithuman")


def create_runtime(
    name: str,
    *,
    width: int = 512,
    height: int = 512,
    api_secret: str | None = None,
) -> Runtime:
    """Make a runtime by its config name (``[avatar] runtime``).

    Imports are lazy so the supervisor never loads native avatar code itself;
    only the renderer child does.
    """
    if name == "reference":
        from appliance.runtimes.reference import ReferenceRuntime

        return ReferenceRuntime(width=width, height=height)
    if name == "bithuman":
        from appliance.runtimes.bithuman import BithumanRuntime

        return BithumanRuntime(api_secret=api_secret)
    raise RuntimeFailure(
        f"unknown runtime {name!r}",
        setting="[avatar] runtime",
        fix=f"use one of: {', '.join(RUNTIME_NAMES)}",
    )
