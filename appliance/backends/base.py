"""The one interface between the supervisor and whatever produces the avatar's frames.

A backend takes the conversation agent's speech (the room's ``SpeechSink``:
``push_audio``, ``flush``, ``interrupt``), makes frames with the audio that goes
with each, and hands its current frame source to the fan-out, which feeds every
sink (room tracks, speaker, screen). Its health is measured from frames actually
flowing, never from "the process is alive".
"""

from __future__ import annotations

from typing import Any, Protocol

from appliance.room.agent import SpeechSink

__all__ = ["Backend"]


class Backend(SpeechSink, Protocol):
    name: str  # "local", later "gpu", "cloud"

    async def close(self) -> None: ...

    def healthy(self) -> bool:
        """Frames at a healthy rate right now."""
        ...

    def status(self) -> dict[str, Any]:
        """This backend's part of ``appliance status``."""
        ...
