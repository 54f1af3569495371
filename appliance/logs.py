"""Logging: journald with structured fields under systemd, plain stderr otherwise.

Code logs with ``extra={"state": ..., "reason": ..., "backend": ..., "model": ...}``;
under journald those become fields (``APPLIANCE_STATE=``, ``APPLIANCE_REASON=``…)
that ``journalctl -u appliance APPLIANCE_STATE=failed`` can filter on.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging", "STRUCTURED_FIELDS"]

STRUCTURED_FIELDS = ("state", "reason", "backend", "model", "room", "agent", "renderer")


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


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
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
    root.addHandler(handler)
    # the SDKs are chatty at INFO; their warnings still show
    for noisy in ("livekit", "livekit.agents", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
