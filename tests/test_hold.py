"""Hold frames: while the source delivers nothing, every sink gets the model's idle loop
(issue 13: no dark frame while a backend restarts or a rung starts)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from appliance.backends.hold import HOLD_AFTER_S, LOOP_FRAMES, SPEECH_HICCUP_S, HoldLoop
from appliance.media import FrameFanout
from appliance.runtimes import Frame


def frame(n: int, speaking: bool = False) -> Frame:
    image = np.full((8, 8, 3), n % 256, np.uint8)  # each frame its own picture
    return Frame(image, np.zeros(640, np.int16), speaking=speaking, meta={"n": str(n)})


def test_a_loop_is_an_unbroken_run_of_idle_frames_kept_for_the_next_run(tmp_path: Path) -> None:
    hold = HoldLoop(tmp_path)
    assert hold.next_frame() is None  # nothing shown yet: nothing to hold
    hold.use_model("reference|a.json|1|8x8")
    for n in range(30):
        hold.record(frame(n))
    hold.record(frame(30, speaking=True))  # speech breaks the run: a loop never shows speech
    assert hold.origin == "none"
    held = hold.next_frame()
    assert held is not None and held.image[0, 0, 0] == 30 and held.meta["held"] == "last frame"
    for n in range(100, 100 + LOOP_FRAMES):
        hold.record(frame(n))
    assert hold.status() == {"loop": "recorded", "loop_frames": LOOP_FRAMES}
    shown = [int(hold.next_frame().image[0, 0, 0]) for _ in range(LOOP_FRAMES + 2)]  # type: ignore[union-attr]
    assert shown == list(range(100, 100 + LOOP_FRAMES)) + [100, 101]  # forward, then again
    [kept] = tmp_path.glob("*.npz")

    again = HoldLoop(tmp_path)  # the next boot: the loop before the model has rendered once
    again.use_model("reference|a.json|1|8x8")
    assert again.origin == "cached" and int(again.next_frame().image[0, 0, 0]) == 100  # type: ignore[union-attr]

    again.use_model("reference|b.json|1|8x8")  # another model: record its own
    assert again.origin == "none" and again.next_frame() is None
    for n in range(LOOP_FRAMES):
        again.record(frame(n))
    assert again.origin == "recorded"
    assert not kept.exists() and len(list(tmp_path.glob("*.npz"))) == 1  # one model's loop on disk


def test_a_torn_loop_file_is_recorded_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hold = HoldLoop(tmp_path)
    hold.use_model("m")
    for n in range(LOOP_FRAMES):
        hold.record(frame(n))
    [kept] = tmp_path.glob("*.npz")
    kept.write_bytes(kept.read_bytes()[:100])  # power lost mid-write on some other filesystem
    with caplog.at_level(logging.WARNING):
        torn = HoldLoop(tmp_path)
        torn.use_model("m")
    assert torn.origin == "none" and "unreadable" in caplog.text


class Pausing:
    """25 fps, then nothing for ``pause_s`` (a renderer restarting), then 25 fps again."""

    def __init__(self, before: int, pause_s: float, after: int) -> None:
        self.before, self.pause_s, self.after = before, pause_s, after
        self.resumed_at = 0.0

    async def frames(self) -> AsyncIterator[Frame]:
        for n in range(self.before + self.after):
            if n == self.before:
                await asyncio.sleep(self.pause_s)
                self.resumed_at = time.monotonic()
            await asyncio.sleep(0.04)
            yield frame(n)


class Seen:
    def __init__(self) -> None:
        self.frames: list[tuple[float, Frame]] = []

    async def send_frame(self, f: Frame) -> None:
        self.frames.append((time.monotonic(), f))


async def test_the_fanout_holds_while_the_source_is_silent_and_health_counts_real_frames() -> None:
    source, seen = Pausing(before=LOOP_FRAMES + 10, pause_s=1.0, after=20), Seen()
    fanout = FrameFanout(source, hold=HoldLoop())
    fanout.hold.use_model("m")
    fanout.add_sink(seen)
    pump = asyncio.create_task(fanout.run())
    await asyncio.sleep((LOOP_FRAMES + 10) * 0.04 + 0.4)  # into the pause
    sent, held_so_far = fanout.frames_sent, fanout.frames_held
    await asyncio.sleep(0.2)
    assert fanout.holding and not fanout.flowing(0.3)  # health counts real frames only
    assert fanout.frames_sent == sent and fanout.frames_held > held_so_far
    await pump
    held = [(t, f) for t, f in seen.frames if "held" in f.meta]
    real = [f for _, f in seen.frames if "n" in f.meta]
    assert len(real) == LOOP_FRAMES + 30 and fanout.frames_sent == len(real)  # every real frame, once
    assert fanout.frames_held == len(held) and 15 <= len(held) <= 27, len(held)  # ~25 fps for ~1 s
    assert all(f.meta["held"] == "recorded" and not f.speaking and not f.audio.any() for _, f in held)
    # the loop plays the recorded idle frames, in order
    assert [int(f.image[0, 0, 0]) for _, f in held[:3]] == [0, 1, 2]
    assert not fanout.holding  # the source came back: no more hold frames
    assert all(t < source.resumed_at + 0.05 for t, _ in held)
    gaps = np.diff([t for t, _ in seen.frames])
    print(f"\nlongest interval at the sink across a 1 s pause: {gaps.max() * 1000:.0f} ms "
          f"(hold after {HOLD_AFTER_S * 1000:.0f} ms, then 25 fps)")


class Hiccup:
    """Speaking frames at 25 fps with one 1.2 s hole in the middle of the reply."""

    def __init__(self) -> None:
        self.resumed_at = 0.0

    async def frames(self) -> AsyncIterator[Frame]:
        for n in range(LOOP_FRAMES):  # idle first: the loop gets recorded
            await asyncio.sleep(0.04)
            yield frame(n)
        for n in range(20):
            if n == 10:
                await asyncio.sleep(1.2)
                self.resumed_at = time.monotonic()
            await asyncio.sleep(0.04)
            yield frame(1000 + n, speaking=True)


async def test_a_hold_in_mid_speech_adds_no_audio_at_first() -> None:
    """A late speaking frame is usually a hiccup: silence from hold frames would push the
    rest of the reply later at every audio sink. Past SPEECH_HICCUP_S the hold is silent."""
    source, seen = Hiccup(), Seen()
    fanout = FrameFanout(source, hold=HoldLoop())
    fanout.hold.use_model("m")
    fanout.add_sink(seen)
    await fanout.run()
    last_speaking = max(t for t, f in seen.frames if f.speaking and t < source.resumed_at)
    held = [(t - last_speaking, len(f.audio)) for t, f in seen.frames if "held" in f.meta]
    assert held and all(n == 0 for dt, n in held if dt < SPEECH_HICCUP_S - 0.05), held
    assert all(n == 640 for dt, n in held if dt > SPEECH_HICCUP_S + 0.05), held


class Slow:
    """A source at 4 fps (a starved device): slow, not stopped."""

    async def frames(self) -> AsyncIterator[Frame]:
        for n in range(12):
            await asyncio.sleep(0.25)
            yield frame(n)


async def test_a_slow_source_is_not_held() -> None:
    seen = Seen()
    fanout = FrameFanout(Slow(), hold=HoldLoop())
    fanout.hold.use_model("m")
    fanout.add_sink(seen)
    await fanout.run()
    real = [t for t, f in seen.frames if "n" in f.meta]
    held = [t for t, f in seen.frames if "held" in f.meta]
    assert len(real) == 12 and all(t < real[1] for t in held), (len(held), "held once its pace was known")
    assert 0.45 <= fanout.hold_after_s() <= 0.6  # two of its own intervals
