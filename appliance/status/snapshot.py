"""What ``appliance status``, ``STATUS=``, ``/healthz`` and ``/metrics`` say, gathered in one place.

The supervisor hands over its parts (:class:`Parts`); this module only reads
them: one line for systemd and the console, one JSON document for the rest.
Nothing secret is ever in either.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import Config, effective_values
from appliance.room import RoomState
from appliance.status.problems import Problems

if TYPE_CHECKING:
    from appliance.backends.ladder import Ladder
    from appliance.backends.local import LocalBackend
    from appliance.devices import Devices
    from appliance.devices.audio_link import AudioLink
    from appliance.media import FrameFanout
    from appliance.models.rollout import ModelUpdates
    from appliance.presence import Presence
    from appliance.room import KioskRoom
    from appliance.room.dispatch import Conversation
    from appliance.screen.screen import Screen

__all__ = ["Parts", "status_line", "snapshot"]


@dataclass
class Parts:
    config: Config
    started_at: float  # monotonic
    backend: LocalBackend
    fanout: FrameFanout
    room: KioskRoom | None
    updates: ModelUpdates | None
    devices: Devices | None
    problems: Problems
    last_presence: float | None  # monotonic time of the last motion/button event
    last_reload: str
    audio: AudioLink | None = None
    screen: Screen | None = None
    presence: Presence | None = None
    conversation: Conversation | None = None
    ladder: Ladder | None = None


def status_line(parts: Parts) -> str:
    """One human line for systemd's STATUS= and `appliance status`."""
    now = time.monotonic()
    runtime = parts.config.avatar.runtime
    renderer = parts.backend.renderer
    if renderer is None or not parts.fanout.flowing(2.0):
        state = renderer.state.value if renderer else "starting"
        problem = parts.problems.first("renderer")
        held = " · holding the picture" if parts.fanout.holding else ""
        return f"renderer {state}{held}" + (f": {problem.line()}" if problem else "")
    fps = f"{parts.fanout.fps():.1f} fps"
    updater = parts.updates.updater if parts.updates else None
    if updater is not None and updater.progress.total and updater.state.value == "downloading":
        share = 100 * updater.progress.done / updater.progress.total
        fps += f" · downloading model {updater.progress.version} ({share:.0f}%)"
    room = parts.room
    if room is None:
        problem = parts.problems.first("room")
        return f"rendering · {runtime} · {fps} · not joining: {problem.line() if problem else ''}"
    if parts.ladder is not None and parts.ladder.active != "local":
        runtime = f"{parts.ladder.active} (fallback: {parts.ladder.reason})"
    if room.state is RoomState.LIVE:
        return f"live in room {room.options.room} · {runtime} · {fps}"
    if room.state is RoomState.WAITING and room.retry_at is not None:
        wait = max(0.0, room.retry_at - now)
        return f"waiting for network (retry in {wait:.0f} s) · {runtime} warm · {fps}"
    return f"{room.state.value} · {runtime} warm · {fps}"


def snapshot(parts: Parts) -> dict[str, Any]:
    """The JSON of `appliance status --json` (and what /healthz, /metrics read)."""
    now = time.monotonic()
    room, problems = parts.room, parts.problems
    spec = parts.backend.spec
    lines = lambda kind: [p.line() for p in problems.list(kind)]  # noqa: E731
    return {
        "status": status_line(parts),
        "uptime_s": round(now - parts.started_at, 1),
        "runtime": parts.config.avatar.runtime,
        "model": spec.model if spec else None,
        "models": parts.updates.status() if parts.updates else None,
        "pid": os.getpid(),
        "fps_10s": round(parts.fanout.fps(), 2),
        # while no frames come, the tracks and the screen get the hold loop (backends/hold.py)
        "hold": {"holding": parts.fanout.holding, "frames_held": parts.fanout.frames_held,
                 "longest_interval_ms_30s": parts.fanout.longest_interval_ms(), **parts.fanout.hold.status()},
        # which backend serves (the fallback ladder): active, state, since, reason, history
        "backend": parts.ladder.status() if parts.ladder else {"active": parts.backend.name},
        "renderer": parts.backend.status(),
        "room": {
            "name": parts.config.livekit.room,
            "url": parts.config.livekit.url,
            "identity": parts.config.livekit.identity,
            "state": room.state.value if room else None,
            "reason": room.state_reason if room else None,
            "frames_published": room.frames_published if room else 0,
        },
        "agent": room.agent_identity if room else None,
        "devices": parts.devices.status() if parts.devices else None,
        # the audio child: visitor participant, microphone live/muted, echo canceller
        "audio": parts.audio.status() if parts.audio else None,
        "display": parts.screen.status() if parts.screen else None,
        "last_presence_ago_s": round(now - parts.last_presence, 1) if parts.last_presence else None,
        # a visitor at the kiosk, and the conversation agent dispatched for them
        "presence": parts.presence.status() if parts.presence else None,
        "conversation": parts.conversation.status() if parts.conversation else None,
        # every open problem, with the setting to change and the fix
        "problems": [p.as_json() for p in problems.list()],
        # the same, as operator lines, by part (what the console shows)
        "problem": "; ".join(lines("renderer") + lines("room")) or None,
        "config_problems": lines("config"),
        "boot_config_problems": lines("boot-config"),
        "config": effective_values(parts.config),
        "last_reload": parts.last_reload or None,
    }
