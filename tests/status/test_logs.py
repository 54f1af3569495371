"""The SDK flood filter: an outage or a starved CPU must not write a journal line every 0.5 s."""

from __future__ import annotations

import logging

from appliance.status.logs import _SdkFlood


def record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)


def test_the_same_sdk_message_passes_once_per_interval_whatever_its_numbers() -> None:
    flood = _SdkFlood(interval_s=300)
    # what livekit.rtc's AVSynchronizer logged twice a second on an emulated kiosk
    behind = [record("livekit.rtc.synchronizer", f"Frame capture was behind schedule for {ms} ms")
              for ms in ("693.99", "417.14", "405.16")]
    assert [flood.filter(r) for r in behind] == [True, False, False]
    # another message, or our own log lines, pass
    assert flood.filter(record("livekit", "signal connection failed on v1 path"))
    assert flood.filter(record("appliance.room", "room live → reconnecting (12 s)"))
    assert flood.filter(record("appliance.room", "room live → reconnecting (13 s)"))
