"""Long-lived tasks with an owner.

Every background coroutine of the daemon is started by a :class:`TaskOwner`,
which keeps it (so it is never garbage-collected mid-flight), names it, logs
its crash with the traceback the moment it happens, and cancels and awaits it
in :func:`stop_tasks`, the one place that does so.

``stop_tasks`` never swallows the caller's own cancellation: the usual
``task.cancel(); with suppress(CancelledError): await task`` also eats a
``cancel()`` aimed at the caller while it waits, and shutdown then hangs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskOwner", "stop_tasks"]

T = TypeVar("T")


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until they have ended; their errors are not raised here
    (an owned task's crash was logged when it happened)."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    if live:
        # asyncio.wait neither raises the tasks' exceptions nor hides a CancelledError
        # aimed at us: that one propagates, as it must
        await asyncio.wait(live)


class TaskOwner:
    """The tasks of one part of the daemon (``who`` names it in the log)."""

    def __init__(self, who: str, logger: logging.Logger) -> None:
        self.who = who
        self._log = logger
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=f"{self.who}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("%s: task %s crashed: %r", self.who, task.get_name(), exc, exc_info=exc,
                            extra={"reason": f"task {task.get_name()} crashed: {exc!r}"})

    @property
    def tasks(self) -> set[asyncio.Task[Any]]:
        return set(self._tasks)

    async def stop(self, *tasks: asyncio.Task[Any] | None) -> None:
        """Cancel and await the given tasks of this owner."""
        await stop_tasks(*tasks)

    async def close(self) -> None:
        """Cancel and await every task still running."""
        await stop_tasks(*self._tasks)
