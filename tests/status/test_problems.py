"""The problem registry: typed, de-duplicated, owned and dismissed by their producer (issue 10)."""

from __future__ import annotations

import logging

import pytest

from appliance.status.problems import Problems


def test_problems_are_owned_deduplicated_and_dismissed_by_their_owner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    changes: list[int] = []
    problems = Problems(on_change=lambda: changes.append(1))
    room, renderer = problems.owner("room"), problems.owner("renderer")
    caplog.set_level(logging.INFO, logger="appliance.status.problems")
    for _ in range(3):  # a retry loop reporting the same thing: one record, one log line
        room.report("the server refused the token", subject="ws://x", setting="[livekit] api_key",
                    fix="check that the key and secret match the server's")
    renderer.report("model file missing", subject="/m.imx", setting="[avatar] model", fix="set it")
    assert len(problems.list()) == 2 and len(changes) == 2
    assert sum("refused the token" in r.getMessage() for r in caplog.records) == 1
    assert problems.first("room").line() == (  # type: ignore[union-attr]
        "[livekit] api_key: the server refused the token — check that the key and secret match"
        " the server's")
    renderer.clear()  # the renderer's check passed: only its problems go
    assert [p.kind for p in problems.list()] == ["room"]
    with pytest.raises(ValueError):
        problems.owner("typo")
    config = problems.owner("config")
    config.replace([("a.toml:3", "bad value", "[avatar] width", "use a number"),
                    ("a.toml:5", "unknown key", "[avatar] widht", "did you mean width?")])
    config.replace([("a.toml:5", "unknown key", "[avatar] widht", "did you mean width?")])
    assert [p.subject for p in config.list()] == ["a.toml:5"]
    assert problems.list("room")[0].as_json()["fix"] == "check that the key and secret match the server's"
