"""State enums of supervised things, and the one helper that changes them.

Every supervised thing (renderer, room, backend, update) has one ``State``
enum and changes it in exactly one place, which logs ``old → new (reason)``
and tells whoever feeds systemd ``STATUS=``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["RendererState", "StateCell"]


class RendererState(enum.Enum):
    STARTING = "starting"  # first child spawned, handshake pending
    WARMING = "warming"  # model opening in the child, no frames yet
    RUNNING = "running"  # handshake done and frames flowing
    STALLED = "stalled"  # no frames for longer than the stall timeout; child being killed
    RESTARTING = "restarting"  # replacement child spawned, handshake pending
    BACKOFF = "backoff"  # waiting before the next restart after repeated failures
    FAILED = "failed"  # the model cannot open (operator must act); retried slowly
    STOPPED = "stopped"  # not started, or closed

    def __str__(self) -> str:
        return self.name


S = TypeVar("S", bound=enum.Enum)


class StateCell(Generic[S]):
    """Holds one state; ``set`` logs ``who: old → new (reason)`` and calls ``on_change``.

    ``on_change(old, new, reason)`` must not raise; if it does, the error is
    logged and the state change still stands.
    """

    def __init__(
        self,
        initial: S,
        *,
        logger: logging.Logger,
        who: str,
        on_change: Callable[[S, S, str], None] | None = None,
    ) -> None:
        self.value = initial
        self.reason = ""
        self._logger = logger
        self._who = who
        self._on_change = on_change

    def set(self, new: S, reason: str, *, level: int = logging.INFO) -> None:
        old = self.value
        if old is new and reason == self.reason:
            return
        self.value, self.reason = new, reason
        self._logger.log(level, "%s: %s → %s (%s)", self._who, old, new, reason,
                         extra={"state": new.value, "reason": reason, "renderer": self._who})
        if self._on_change is not None:
            try:
                self._on_change(old, new, reason)
            except Exception:
                self._logger.exception("%s: on_state callback failed", self._who)
