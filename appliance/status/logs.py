"""Logging: journald with structured fields under systemd, plain stderr otherwise.

Code logs with ``extra={"state": ..., "reason": ..., "backend": ..., "model": ...}``;
under journald those become fields (``APPLIANCE_STATE=``, ``APPLIANCE_REASON=``…)
that ``journalctl -u appliance APPLIANCE_STATE=failed`` can filter on.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

__all__ = ["setup_logging", "apply_levels", "STRUCTURED_FIELDS"]

STRUCTURED_FIELDS = ("state", "reason", "backend", "model", "room", "agent", "renderer",
                     "presence", "source", "visit_s", "dispatch_id", "agent_name", "agent_came_s")


def _under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _FieldsFilter(logging.Filter):
    """Copy our structured extras into journald field names."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in STRUCTURED_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                setattr(record, f"APPLIANCE_{name.upper()}", str(value))
        return True


class _SdkFlood(logging.Filter):
    """Keep the SDKs from flooding the journal (and wearing an SD card) during an outage.

    While the server is unreachable, the livekit SDK logs several warnings per
    attempt; our own log says why once per outage. The same SDK message (by its
    first words) passes at most once per ``interval_s``.
    """

    # An agent that does not wait for playback start never registers this RPC; the
    # avatar protocol still sends it (as AvatarRunner does), so the error is expected.
    EXPECTED = ("remote participant didn't register lk.playback_started RPC",)

    def __init__(self, interval_s: float = 300.0) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("livekit", "aiortc", "aioice")):
            return True
        message = record.getMessage()
        if message.startswith(self.EXPECTED):
            return False
        # numbers do not make a message new ("behind schedule for 693.99 ms", then "417.14 ms")
        key = f"{record.name}:{record.levelno}:{re.sub(r'[0-9.]+', '#', message)[:60]}"
        now = time.monotonic()
        if now - self._last.get(key, -self._interval_s) < self._interval_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


SDK_LOGGERS = ("livekit", "livekit.agents", "aioice", "aiortc")


def apply_levels(level: str, sdk_level: str = "warning") -> None:
    """Set the appliance's and the SDKs' log levels (at start and on reload, in place)."""
    logging.getLogger().setLevel(level.upper())
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(sdk_level.upper())


def setup_logging(level: str = "info", sdk_level: str = "warning") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler | None = None
    if _under_journald():
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found,unused-ignore]

            handler = JournalHandler(SYSLOG_IDENTIFIER="appliance")
            handler.addFilter(_FieldsFilter())
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_SdkFlood())
    root.addHandler(handler)
    apply_levels(level, sdk_level)
