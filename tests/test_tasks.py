"""Backoff and owned tasks (issue 10)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from appliance.retry import Backoff
from appliance.tasks import TaskOwner, stop_tasks


def test_backoff_grows_caps_and_resets() -> None:
    renderer = Backoff(first_s=1.0, max_s=30.0, immediate=True)
    assert [renderer.next_delay() for _ in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert renderer.at_cap
    renderer.reset()
    assert renderer.next_delay() == 0.0 and not renderer.at_cap
    room = Backoff(first_s=0.5, max_s=10.0, jitter=0.2)
    delays = [room.next_delay() for _ in range(12)]
    assert 0.4 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2
    assert all(8.0 <= d <= 12.0 for d in delays[6:]), delays
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered: a fleet does not retry in lockstep


async def test_owned_task_crash_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("room", logging.getLogger("test.tasks"))

    async def boom() -> None:
        raise ValueError("bad frame")

    task = owner.spawn(boom(), "publish")
    await asyncio.wait([task])
    await asyncio.sleep(0)
    record = next(r for r in caplog.records if "crashed" in r.getMessage())
    assert "room: task room:publish crashed: ValueError('bad frame')" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert owner.tasks == set()


async def test_stop_tasks_cancels_and_waits_but_keeps_the_callers_cancellation() -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a moment
            ended.append(name)

    owner = TaskOwner("t", logging.getLogger("test.tasks"))
    a, b = owner.spawn(forever("a"), "a"), owner.spawn(forever("b"), "b")
    await asyncio.sleep(0)
    await owner.stop(a)
    assert ended == ["a"] and a.cancelled() and not b.done()

    # the caller is cancelled while it waits for b's cleanup: that cancellation must propagate
    async def caller() -> str:
        await stop_tasks(b)
        return "returned normally"

    outer = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.wait([b])
    assert b.cancelled() and ended == ["a", "b"]
    await owner.close()


async def test_a_slow_shutdown_names_where_each_task_waits() -> None:
    # what the daemon logs when stopping takes longer than STOP_REPORT_S
    from appliance.supervisor import _waiting_in

    gate = asyncio.Event()

    async def inner_wait() -> None:
        await gate.wait()

    async def hangs() -> None:
        await inner_wait()

    async def closes() -> None:
        await asyncio.sleep(30)

    hung = asyncio.create_task(hangs(), name="room:agents")
    root = asyncio.ensure_future(closes())
    await asyncio.sleep(0)
    try:
        lines = _waiting_in(root)
        print("\n" + "\n".join(lines))
        assert any(line.startswith("room:agents at ") and "inner_wait" in line for line in lines), lines
        assert any(line.startswith("shutdown at ") and "closes" in line for line in lines), lines
    finally:
        gate.set()
        root.cancel()
        await asyncio.gather(hung, root, return_exceptions=True)
