"""Frames from the active source to every sink.

    source (a backend: today the local renderer) ──► FrameFanout ──┬─► room tracks
                                                                   ├─► local speaker
                                                                   └─► screen, relay, test recorder ...

A :class:`FrameSink` takes one frame with the audio slice that plays with it.
The fan-out delivers every frame of the active source to every sink, in sink
order, and switches sources on a frame boundary: the frame being delivered
finishes on every sink, the next one comes from the new source. A model swap
therefore never shows a half-old, half-new moment, and no frame is thrown away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

from appliance.runtimes import Frame

__all__ = ["FrameSink", "FrameSource", "FrameFanout", "FpsMeter"]

log = logging.getLogger("appliance.media")


class FrameSink(Protocol):
    """Anything that shows or sends frames: a frame and its audio slice in.

    A sink that buffers audio of its own (a speaker) may also have ``drop_audio()``,
    called on a barge-in so that the voice stops at once everywhere."""

    async def send_frame(self, frame: Frame) -> None: ...


class FrameSource(Protocol):
    """What produces frames: ``frames()`` yields until the source is closed."""

    def frames(self) -> AsyncIterator[Frame]: ...


class FpsMeter:
    """Frames per second over a sliding window (monotonic clock)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        self._expire(now)

    def fps(self, now: float) -> float:
        self._expire(now)
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(now - self._times[0], 1e-6)

    def _expire(self, now: float) -> None:
        while self._times and now - self._times[0] > self._window_s:
            self._times.popleft()


class FrameFanout:
    """Delivers the active source's frames to every sink; see the module docstring.

    ``run()`` is the pump (one task); it ends when the active source ends without a
    switch pending (the source was closed for good).
    """

    def __init__(self, source: FrameSource | None = None) -> None:
        self._source = source
        self._sinks: list[FrameSink] = []
        self._switched = asyncio.Event()
        self.last_frame_at: float | None = None
        self.frames_sent = 0
        self.meter = FpsMeter()
        self._sink_errors: dict[int, float] = {}  # id(sink) → when its last error was logged

    @property
    def source(self) -> FrameSource | None:
        return self._source

    def add_sink(self, sink: FrameSink) -> None:
        if sink not in self._sinks:
            self._sinks.append(sink)

    def remove_sink(self, sink: FrameSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def switch_to(self, source: FrameSource) -> None:
        """From the next frame on, frames come from ``source``."""
        self._source = source
        self._switched.set()

    def drop_queued_audio(self) -> None:
        """Barge-in: every sink that buffers audio drops what it holds."""
        for sink in self._sinks:
            drop = getattr(sink, "drop_audio", None)
            if drop is not None:
                drop()

    def flowing(self, within_s: float = 1.0) -> bool:
        return self.last_frame_at is not None and time.monotonic() - self.last_frame_at < within_s

    def fps(self) -> float:
        return self.meter.fps(time.monotonic())

    async def run(self) -> None:
        while True:
            source = self._source
            if source is None:
                self._switched.clear()
                await self._switched.wait()
                continue
            self._switched.clear()
            async for frame in source.frames():
                await self._deliver(frame)  # the last frame of the old source too
                if source is not self._source:
                    break  # switched: the next frame comes from the new source
            else:
                if source is self._source:
                    return  # closed, and nothing replaced it

    async def _deliver(self, frame: Frame) -> None:
        now = time.monotonic()
        self.last_frame_at = now
        self.meter.tick(now)
        self.frames_sent += 1
        for sink in list(self._sinks):
            try:
                await sink.send_frame(frame)
            except asyncio.CancelledError:
                raise
            except Exception:  # one broken sink must not stop the others (or the room)
                last = self._sink_errors.get(id(sink), 0.0)
                if now - last > 60.0:
                    self._sink_errors[id(sink)] = now
                    log.exception("frame sink %s failed (logged once a minute)", type(sink).__name__)
