"""Noticing config edits: a debounced directory watch, and what changed.

Editors save in many ways: write in place, write a temp file and rename it
over the original (so a watch on the *file* goes stale), leave ``.swp`` or
``~`` files, or save half a file first. So the watch is on the directories,
events for unrelated names are ignored, and a reload runs only after the
files have been quiet for ``debounce_s``. A half-written file that fails to
parse is harmless: the reload is refused, the last good config keeps
running, and the next save triggers another attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from appliance.config import SECTIONS, Config

__all__ = ["ConfigWatcher", "diff_configs", "IGNORED_PATTERNS"]

log = logging.getLogger("appliance.config.watch")

# editor droppings and backups that never hold config
IGNORED_PATTERNS = ("*.swp", "*.swx", "*.swo", "*~", ".#*", "#*#", "4913", "*.tmp", "*.bak", "*.dpkg-*")


def diff_configs(old: Config, new: Config) -> list[str]:
    """``section.key`` of every setting that differs (secrets included, by name only)."""
    changed = []
    for section in SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                changed.append(f"{section}.{f.name}")
    for name in sorted(set(old.secrets) | set(new.secrets)):
        if old.secrets.get(name) != new.secrets.get(name):
            changed.append(f"secret {name}")
    return changed


class _Handler(FileSystemEventHandler):
    def __init__(self, relevant: Callable[[str], bool], poke: Callable[[], None]) -> None:
        self._relevant = relevant
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        if any(p and self._relevant(os.fsdecode(p)) for p in paths):
            self._poke()


class ConfigWatcher:
    """Calls ``on_change()`` in the event loop after the config files were quiet for a while."""

    def __init__(
        self,
        paths: list[Path],
        dropin_dirs: list[Path],
        on_change: Callable[[], None],
        *,
        debounce_s: float = 0.5,
    ) -> None:
        self._files = {str(p.absolute()) for p in paths}
        self._dropin_dirs = {str(d.absolute()) for d in dropin_dirs}
        self._dirs = sorted({str(p.absolute().parent) for p in paths} | self._dropin_dirs)
        self._on_change = on_change
        self._debounce_s = debounce_s
        self._observer: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def relevant(self, path: str) -> bool:
        name = os.path.basename(path)
        if any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED_PATTERNS):
            return False
        path = os.path.abspath(path)
        if path in self._files:
            return True
        return os.path.dirname(path) in self._dropin_dirs and name.endswith(".toml")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        observer = Observer()
        handler = _Handler(self.relevant, self._poke)
        for directory in self._dirs:
            if os.path.isdir(directory):
                observer.schedule(handler, directory, recursive=False)
            else:
                log.warning("not watching %s: no such directory (edits there need a reload)", directory)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _poke(self) -> None:
        """From the watchdog thread: (re)arm the debounce timer in the loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_later(self._debounce_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._on_change()  # the supervisor's request_reload: it owns the reload task

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
