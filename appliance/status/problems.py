"""Problems the operator must act on, as records, in one registry.

Each problem is owned by the part that detects it (config, renderer, room,
devices, display, boot import, updates): only that part reports it, and only that part
dismisses it, when its own check passes. So one part fixing itself can never
erase another part's reason (a model swap once cleared the room's "not
joining: ..." line). ``appliance status`` (``problems``), ``/metrics``,
``STATUS=`` and the journal all read this registry.

    problems = Problems()
    room = problems.owner("room")
    room.report("[livekit] url: cannot connect ...", subject="ws://...", setting="[livekit] url",
                fix="check the network")
    room.clear()                       # connected: the room's problems are gone
    problems.list()                    # every open problem, oldest first

A problem is identified by ``(kind, subject)``: reporting it again replaces
it (and logs only when the text changed), so a retry loop does not flood.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.errors import OperatorError

__all__ = ["Problem", "Problems", "ProblemOwner"]

log = logging.getLogger("appliance.status.problems")

KINDS = ("config", "boot-config", "renderer", "backend", "room", "agent", "devices", "audio", "display",
         "updates")


@dataclass(frozen=True)
class Problem:
    kind: str  # who owns it: one of KINDS
    subject: str  # what it is about (a file, a device, a model, a URL); "" for the whole part
    message: str  # what is wrong, one line
    setting: str = ""  # the setting to change, e.g. "[livekit] api_secret_file"
    fix: str = ""  # how to fix it
    since: float = field(default_factory=time.monotonic, compare=False)

    def line(self) -> str:
        """``[section] key: what is wrong — fix``, as every operator message reads."""
        text = self.message
        if self.setting and self.setting not in text:
            text = f"{self.setting}: {text}"
        if self.fix and self.fix not in text:
            text = f"{text} — {self.fix}"
        return text

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("since")
        data["line"] = self.line()
        return data


class Problems:
    """The registry. ``on_change()`` is called after every change (STATUS=, the LED)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._open: dict[tuple[str, str], Problem] = {}
        self.on_change = on_change

    def owner(self, kind: str) -> ProblemOwner:
        if kind not in KINDS:
            raise ValueError(f"unknown problem kind {kind!r} (one of {', '.join(KINDS)})")
        return ProblemOwner(self, kind)

    def list(self, kind: str | None = None) -> list[Problem]:
        return [p for p in self._open.values() if kind is None or p.kind == kind]

    def first(self, kind: str) -> Problem | None:
        return next(iter(self.list(kind)), None)

    def _report(self, problem: Problem, *, logged: bool = False) -> None:
        key = (problem.kind, problem.subject)
        old = self._open.get(key)
        if old is not None and old.line() == problem.line():
            return
        # keep the first-seen time of a problem that only changes its wording
        self._open[key] = problem if old is None else Problem(**{**asdict(problem), "since": old.since})
        if not logged:
            log.error("%s", problem.line(), extra={"reason": problem.line(), "problem": problem.kind})
        self._changed()

    def _dismiss(self, kind: str, subjects: Iterable[str] | None) -> None:
        keys = [k for k in self._open if k[0] == kind and (subjects is None or k[1] in subjects)]
        for key in keys:
            problem = self._open.pop(key)
            log.info("resolved: %s", problem.line(), extra={"problem": kind})
        if keys:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("problems: on_change failed")


class ProblemOwner:
    """The handle a part holds: it reports and dismisses its own kind of problem only."""

    def __init__(self, registry: Problems, kind: str) -> None:
        self._registry, self.kind = registry, kind

    def report(self, message: str, *, subject: str = "", setting: str = "", fix: str = "",
               logged: bool = False) -> Problem:
        """Open (or update) a problem; ``logged``: the caller has written it to the journal."""
        problem = Problem(self.kind, subject, message, setting, fix)
        self._registry._report(problem, logged=logged)
        return problem

    def report_error(self, error: OperatorError, *, subject: str = "") -> Problem:
        return self.report(str(error), subject=subject, setting=error.setting, fix=error.fix)

    def dismiss(self, subject: str = "") -> None:
        self._registry._dismiss(self.kind, [subject])

    def clear(self) -> None:
        """Every problem of this kind is gone (its check passed)."""
        self._registry._dismiss(self.kind, None)

    def replace(self, reports: Iterable[tuple[str, str, str, str]], *, logged: bool = False) -> None:
        """Exactly these ``(subject, message, setting, fix)`` are open now (e.g. after a reload)."""
        wanted = list(reports)
        keep = {subject for subject, *_ in wanted}
        stale = [p.subject for p in self._registry.list(self.kind) if p.subject not in keep]
        self._registry._dismiss(self.kind, stale)
        for subject, message, setting, fix in wanted:
            self.report(message, subject=subject, setting=setting, fix=fix, logged=logged)

    def list(self) -> list[Problem]:
        return self._registry.list(self.kind)
