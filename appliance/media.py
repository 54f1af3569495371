"""Frames from the active source to every sink.

    source (a backend: today the local renderer) ──► FrameFanout ──┬─► room tracks
                                                                   ├─► local speaker
                                                                   └─► screen, relay, test recorder ...

A :class:`FrameSink` takes one frame with the audio slice that plays with it.
The fan-out delivers every frame of the active source to every sink, in sink
order, and switches sources on a frame boundary: the frame being delivered
finishes on every sink, the next one comes from the new source. A model swap
therefore never shows a half-old, half-new moment, and no frame is thrown away.

When the source delivers nothing for two frame intervals (a renderer restarting),
the fan-out sends hold frames (backends/hold.py) at 25 fps until it does again:
no sink ever waits for a picture. Health (``flowing``, ``fps``) counts real
frames only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Protocol

from appliance.backends.hold import (
    HOLD_AFTER_INTERVALS,
    HOLD_AFTER_S,
    HOLD_FPS,
    SPEECH_HICCUP_S,
    HoldLoop,
)
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


def _retrieved(future: asyncio.Future[Frame]) -> None:
    """A pull that ended with the source (or was cancelled) is not an unhandled error."""
    if not future.cancelled():
        future.exception()


class FrameFanout:
    """Delivers the active source's frames to every sink; see the module docstring.

    ``run()`` is the pump (one task); it ends when the active source ends without a
    switch pending (the source was closed for good).
    """

    def __init__(self, source: FrameSource | None = None, hold: HoldLoop | None = None) -> None:
        self._source = source
        self._sinks: list[FrameSink] = []
        self._switched = asyncio.Event()
        self._delivering = asyncio.Lock()  # real and hold frames never interleave in a sink
        self.hold = hold if hold is not None else HoldLoop()
        self.last_frame_at: float | None = None  # the last real frame
        self.last_frame_speaking = False
        self.last_held_at: float | None = None
        self.frames_sent = 0
        self.frames_held = 0
        self._delivered: deque[tuple[float, float]] = deque()  # (when, wait since the one before)
        self._real_intervals: deque[float] = deque(maxlen=25)  # between the source's last frames
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

    @property
    def holding(self) -> bool:
        """Hold frames are being sent: the source delivers nothing."""
        return self.last_held_at is not None and (self.last_frame_at or 0.0) < self.last_held_at

    async def run(self) -> None:
        holding = asyncio.create_task(self._hold(), name="fan-out hold")
        try:
            await self._pump()
        finally:
            holding.cancel()

    async def _pump(self) -> None:
        while True:
            source = self._source
            if source is None:
                self._switched.clear()
                await self._switched.wait()
                continue
            self._switched.clear()
            if await self._pump_from(source):
                return  # closed, and nothing replaced it

    async def _pump_from(self, source: FrameSource) -> bool:
        """Frames of ``source`` until a switch (False) or its end (True: nothing replaced it).
        A switch while the source is silent (a hung renderer) does not wait for its next frame."""
        frames = source.frames().__aiter__()
        switched = asyncio.ensure_future(self._switched.wait())
        pulling: asyncio.Future[Frame] | None = None
        try:
            while True:
                pulling = asyncio.ensure_future(frames.__anext__())
                pulling.add_done_callback(_retrieved)
                await asyncio.wait({pulling, switched}, return_when=asyncio.FIRST_COMPLETED)
                if not pulling.done():
                    pulling.cancel()  # ends that generator; the source makes a new one next time
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await pulling
                    return False
                try:
                    frame = pulling.result()
                except StopAsyncIteration:
                    return source is self._source
                await self._deliver(frame)  # the last frame of the old source too
                if source is not self._source:
                    return False  # switched: the next frame comes from the new source
        finally:
            switched.cancel()
            if pulling is not None:
                pulling.cancel()  # the pump itself was cancelled (the kiosk is stopping)

    async def _hold(self) -> None:
        """Hold frames on a 25 fps schedule from ``hold_after_s()`` after the last real frame."""
        interval = 1.0 / HOLD_FPS
        while True:
            now = time.monotonic()
            due = (self.last_held_at + interval if self.holding and self.last_held_at is not None
                   else (self.last_frame_at or now) + self.hold_after_s())
            if due > now:
                await asyncio.sleep(due - now)
                continue  # a real frame may have come meanwhile
            since = now - (self.last_frame_at or now)
            frame = self.hold.next_frame(with_audio=not self.last_frame_speaking or since > SPEECH_HICCUP_S)
            if frame is None:  # nothing shown yet, nothing to hold
                await asyncio.sleep(interval)
                continue
            await self._deliver(frame, held=True)

    async def _deliver(self, frame: Frame, held: bool = False) -> None:
        async with self._delivering:
            now = time.monotonic()
            if held:
                if self.last_frame_at is not None and now - self.last_frame_at < self.hold_after_s():
                    return  # the source came back while this one waited
                self.last_held_at = now
                self.frames_held += 1
            else:
                if self.last_frame_at is not None:
                    self._real_intervals.append(now - self.last_frame_at)
                self.last_frame_at, self.last_frame_speaking = now, frame.speaking
                self.meter.tick(now)
                self.frames_sent += 1
                self.hold.record(frame)
            self._count_interval(now)
            await self._to_sinks(frame, now)

    def hold_after_s(self) -> float:
        """How long the source may be silent before hold frames go out: two frame intervals at
        25 fps, or two of its own when it is slower (its median over the last second or so)."""
        if not self._real_intervals:
            return HOLD_AFTER_S
        typical = sorted(self._real_intervals)[len(self._real_intervals) // 2]
        return max(HOLD_AFTER_S, HOLD_AFTER_INTERVALS * typical)

    def _count_interval(self, now: float) -> None:
        if self._delivered:
            self._delivered.append((now, now - self._delivered[-1][0]))
        else:
            self._delivered.append((now, 0.0))
        while now - self._delivered[0][0] > 30.0:
            self._delivered.popleft()

    def longest_interval_ms(self) -> float:
        """The longest wait between two frames to the sinks (real or hold) in the last 30 s."""
        return round(1000 * max((gap for _, gap in self._delivered), default=0.0), 1)

    async def _to_sinks(self, frame: Frame, now: float) -> None:
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
