"""Whether a visitor is at the kiosk: one visit at a time, from every sign of someone.

Signs: the motion sensor (held while it sees motion), the button (a press), and
`appliance presence arrive|leave` (held from arrive to leave: what operators and tests use
to play a visitor). A visit starts with the first sign; it ends ``end_after_absent_s`` after
the last held sign went away (or after a press, if nothing holds), at once on a long button
press (``LONG_PRESS_S``: "goodbye"), or ``max_session_s`` after it started. A sign during the
countdown keeps the visit going.

    presence = Presence(end_after_absent_s=60, max_session_s=1800, on_visit=...)
    presence.motion(True); presence.button(True); presence.arrive("cli"); presence.leave("cli")
    presence.status()   # present, since, source, visits, last visit's length

``on_visit(started, why)`` runs on the event loop when a visit starts (True) or ends (False).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Presence", "LONG_PRESS_S"]

log = logging.getLogger("appliance.presence")

LONG_PRESS_S = 2.0  # holding the button this long ends the visit


class Presence:
    def __init__(self, *, end_after_absent_s: float, max_session_s: float,
                 on_visit: Callable[[bool, str], None]) -> None:
        self.end_after_absent_s = end_after_absent_s
        self.max_session_s = max_session_s
        self._on_visit = on_visit
        self.present = False
        self.since: float | None = None  # wall time the current visit started, or the last ended
        self.source = ""  # what started the current visit
        self.visits = 0
        self.last_visit_s: float | None = None
        self._started_mono = 0.0
        self._held: set[str] = set()  # signs that say "still here" until they go away
        self._pressed_at: float | None = None
        self._absent: asyncio.TimerHandle | None = None
        self._too_long: asyncio.TimerHandle | None = None

    def set_limits(self, *, end_after_absent_s: float, max_session_s: float) -> None:
        """A config reload: applies from the next countdown on."""
        self.end_after_absent_s, self.max_session_s = end_after_absent_s, max_session_s

    # -- signs --------------------------------------------------------------------------

    def motion(self, active: bool) -> None:
        (self.arrive if active else self.leave)("motion sensor")

    def button(self, pressed: bool) -> None:
        if pressed:
            self._pressed_at = time.monotonic()
            self.arrive("button", hold=False)
        elif self._pressed_at is not None:
            held_s, self._pressed_at = time.monotonic() - self._pressed_at, None
            if held_s >= LONG_PRESS_S and self.present:
                self.end(f"long button press ({held_s:.1f} s)")

    def arrive(self, source: str, *, hold: bool = True) -> None:
        if hold:
            self._held.add(source)
        self._cancel(absent=True)
        if not self.present:
            self.present, self.source, self.since = True, source, time.time()
            self._started_mono = time.monotonic()
            self.visits += 1
            log.info("visitor arrived (%s)", source, extra={"presence": "arrived", "source": source})
            if self.max_session_s > 0:
                self._too_long = self._later(self.max_session_s,
                                             f"the visit reached [agent] max_session_s = {self.max_session_s:g} s")
            self._on_visit(True, source)
        if not self._held:
            self._count_down()

    def leave(self, source: str) -> None:
        self._held.discard(source)
        if self.present and not self._held and self._absent is None:
            self._count_down()

    def end(self, why: str) -> None:
        """The visit is over now."""
        self._held.clear()
        self._cancel(absent=True, too_long=True)
        if not self.present:
            return
        self.present, self.since = False, time.time()
        self.last_visit_s = time.monotonic() - self._started_mono
        log.info("visit ended after %.0f s: %s", self.last_visit_s, why,
                 extra={"presence": "ended", "reason": why, "visit_s": round(self.last_visit_s, 1)})
        self._on_visit(False, why)

    # -- timers -------------------------------------------------------------------------

    def _count_down(self) -> None:
        self._cancel(absent=True)
        self._absent = self._later(self.end_after_absent_s,
                                   f"nobody seen for [agent] end_after_absent_s = {self.end_after_absent_s:g} s")

    def _later(self, delay_s: float, why: str) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay_s, self.end, why)

    def _cancel(self, *, absent: bool = False, too_long: bool = False) -> None:
        if absent and self._absent is not None:
            self._absent.cancel()
            self._absent = None
        if too_long and self._too_long is not None:
            self._too_long.cancel()
            self._too_long = None

    def close(self) -> None:
        self._cancel(absent=True, too_long=True)

    def status(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "since": round(self.since, 3) if self.since else None,
            "source": self.source if self.present else None,
            "held_by": sorted(self._held),
            "ending_in_s": (round(max(0.0, self._absent.when() - asyncio.get_running_loop().time()), 1)
                            if self._absent is not None else None),
            "visits": self.visits,
            "last_visit_s": round(self.last_visit_s, 1) if self.last_visit_s is not None else None,
        }
