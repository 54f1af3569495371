"""The frame fan-out: one active source, every sink, switches on a frame boundary (issue 10)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from appliance.media import FrameFanout
from appliance.runtimes import Frame


class Source:
    """Numbered frames at a steady pace until closed (a stand-in for a renderer)."""

    def __init__(self, name: str, interval_s: float = 0.002) -> None:
        self.name, self.interval_s = name, interval_s
        self.made = 0
        self.closed = asyncio.Event()

    async def frames(self) -> AsyncIterator[Frame]:
        while not self.closed.is_set():
            await asyncio.sleep(self.interval_s)
            frame = Frame(np.zeros((4, 4, 3), np.uint8), np.zeros(640, np.int16),
                          meta={"id": f"{self.name}{self.made}"})
            self.made += 1
            yield frame


class Recorder:
    def __init__(self, slow_s: float = 0.0) -> None:
        self.seen: list[str] = []
        self.slow_s = slow_s

    async def send_frame(self, frame: Frame) -> None:
        self.seen.append(frame.meta.get("id", "held"))
        if self.slow_s:
            await asyncio.sleep(self.slow_s)


class Broken:
    async def send_frame(self, frame: Frame) -> None:
        raise RuntimeError("unplugged")


async def test_two_sinks_see_every_frame_once_in_order_across_a_switch() -> None:
    a, b = Source("a"), Source("b")
    fanout = FrameFanout(a)
    fast, slow = Recorder(), Recorder(slow_s=0.003)  # a slow sink paces the pump, loses nothing
    for sink in (fast, Broken(), slow):
        fanout.add_sink(sink)
    pump = asyncio.create_task(fanout.run())
    while len(fast.seen) < 20:
        await asyncio.sleep(0.005)
    fanout.switch_to(b)
    while not any(i.startswith("b") for i in fast.seen[-1:]) or len(fast.seen) < 40:
        await asyncio.sleep(0.005)
    a.closed.set()  # the old source is closed after the switch, as the supervisor does
    b.closed.set()
    await asyncio.wait_for(pump, 5)

    assert fast.seen == slow.seen  # both sinks saw the same frames in the same order
    assert len(set(fast.seen)) == len(fast.seen)  # each once
    switch = next(i for i, x in enumerate(fast.seen) if x.startswith("b"))
    assert fast.seen[:switch] == [f"a{i}" for i in range(switch)]  # a's frames in order, none lost
    assert fast.seen[switch:] == [f"b{i}" for i in range(len(fast.seen) - switch)]  # b's, from b0
    assert fanout.frames_sent == len(fast.seen)


async def test_pump_ends_when_its_source_closes_and_waits_when_it_has_none() -> None:
    fanout = FrameFanout()
    sink = Recorder()
    fanout.add_sink(sink)
    pump = asyncio.create_task(fanout.run())
    await asyncio.sleep(0.05)
    assert not pump.done() and sink.seen == [] and not fanout.flowing()
    source = Source("s")
    fanout.switch_to(source)
    while len(sink.seen) < 5:
        await asyncio.sleep(0.005)
    assert fanout.flowing(1.0)
    source.closed.set()
    await asyncio.wait_for(pump, 5)


class Hung(Source):
    """A few frames, then nothing ever again (a renderer stuck in a native call)."""

    async def frames(self) -> AsyncIterator[Frame]:
        async for frame in super().frames():
            yield frame
            if self.made == 3:
                await asyncio.Event().wait()


async def test_a_switch_away_from_a_hung_source_does_not_wait_for_its_next_frame() -> None:
    hung, fresh = Hung("a"), Source("b")
    fanout, recorder = FrameFanout(hung), Recorder()
    fanout.add_sink(recorder)
    pump = asyncio.create_task(fanout.run())
    await asyncio.sleep(0.1)
    assert [i for i in recorder.seen if i.startswith("a")] == ["a0", "a1", "a2"]
    fanout.switch_to(fresh)
    await asyncio.sleep(0.1)
    assert any(i.startswith("b") for i in recorder.seen), recorder.seen  # the hung one did not hold it up
    fresh.closed.set()
    await asyncio.wait_for(pump, 2)
