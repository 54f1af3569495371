"""A visit: from the first sign of someone to end_after_absent_s after the last (issue 12)."""

from __future__ import annotations

import asyncio

import pytest

from appliance.presence import LONG_PRESS_S, Presence


@pytest.fixture
def visits() -> tuple[Presence, list[tuple[bool, str]]]:
    seen: list[tuple[bool, str]] = []
    presence = Presence(end_after_absent_s=0.3, max_session_s=0,
                        on_visit=lambda started, why: seen.append((started, why)))
    return presence, seen


async def test_motion_holds_the_visit_and_absence_ends_it(visits) -> None:  # type: ignore[no-untyped-def]
    presence, seen = visits
    presence.motion(True)
    presence.motion(True)  # more motion: the same visit
    await asyncio.sleep(0.5)
    assert seen == [(True, "motion sensor")] and presence.present  # held while motion is seen
    presence.motion(False)
    await asyncio.sleep(0.15)
    presence.motion(True)  # back before the countdown ended: the visit goes on
    presence.motion(False)
    await asyncio.sleep(0.15)
    assert presence.present and presence.status()["ending_in_s"] is not None
    await asyncio.sleep(0.3)
    assert not presence.present
    assert seen[-1] == (False, "nobody seen for [agent] end_after_absent_s = 0.3 s")
    assert presence.status()["visits"] == 1 and presence.status()["last_visit_s"] >= 0.7


async def test_the_command_line_holds_until_leave(visits) -> None:  # type: ignore[no-untyped-def]
    presence, seen = visits
    presence.arrive("appliance presence")
    presence.motion(False)  # the sensor saw nobody: the operator's arrive still holds
    await asyncio.sleep(0.5)
    assert presence.present and presence.status()["held_by"] == ["appliance presence"]
    presence.leave("appliance presence")
    await asyncio.sleep(0.5)
    assert [started for started, _ in seen] == [True, False]


async def test_a_press_starts_a_visit_and_a_long_press_ends_it(visits, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    presence, seen = visits
    presence.end_after_absent_s = 30
    clock = [100.0]
    monkeypatch.setattr("appliance.presence.time.monotonic", lambda: clock[0])
    presence.button(True)
    presence.button(False)  # a short press: someone is here, nothing holds it
    assert presence.present and presence.status()["ending_in_s"] is not None
    presence.button(True)
    clock[0] += LONG_PRESS_S + 0.1
    presence.button(False)
    assert not presence.present
    assert seen[-1][0] is False and seen[-1][1].startswith("long button press")


async def test_max_session_ends_a_visit_that_never_stops(visits) -> None:  # type: ignore[no-untyped-def]
    presence, seen = visits
    presence.max_session_s = 0.3
    presence.motion(True)  # someone stands there for ever
    await asyncio.sleep(0.5)
    assert not presence.present
    assert seen[-1] == (False, "the visit reached [agent] max_session_s = 0.3 s")
    presence.motion(True)  # still moving: a new visit
    assert presence.present and presence.visits == 2
    presence.close()
