"""systemd's notify protocol: READY, WATCHDOG, STATUS, RELOADING, STOPPING.

Uses ``systemd.daemon.notify`` from systemd-python when it is installed and a
few lines of pure Python (one datagram to $NOTIFY_SOCKET) when it is not.
Outside systemd every call is a no-op.

The watchdog is fed from real frame flow, not from "the loop is alive": the
supervisor calls ``watchdog_ping()`` only while frames advance, so a renderer
the supervisor cannot recover, or a supervisor that hangs, lets systemd's
WatchdogSec fire and restart the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

__all__ = ["Notifier", "Reporter"]

log = logging.getLogger("appliance.supervisor")


def _send_datagram(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        watchdog_for_us = usec is not None and (pid is None or pid == str(os.getpid()))
        # ping at half the interval, as sd_watchdog_enabled(3) advises
        self.watchdog_interval_s = int(usec) / 2e6 if watchdog_for_us and usec else None
        self._last_status = ""
        try:
            from systemd import daemon  # type: ignore[attr-defined,import-not-found,unused-ignore]

            self._notify = lambda message: bool(daemon.notify(message))
        except ImportError:
            self._notify = _send_datagram

    def send(self, message: str) -> None:
        if self.enabled:
            try:
                self._notify(message)
            except OSError:
                pass  # systemd went away (shutdown); nothing to tell

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog_ping(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        """While a model loads (~20 s for bitHuman), ask for more start time."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


class Reporter:
    """READY once frames flow; STATUS= as things change; WATCHDOG=1 only while frames advance.

    A model that cannot open is diagnosed, not hung: the service becomes "active" and
    says why, rather than have systemd restart it in a loop that cannot help.
    """

    def __init__(self, notifier: Notifier, *, flowing: Callable[[float], bool],
                 failed: Callable[[], bool], line: Callable[[], str],
                 watchdog_grace_s: float) -> None:
        self.notifier = notifier
        self._flowing, self._failed, self._line = flowing, failed, line
        self._grace_s = watchdog_grace_s
        self.ready = False

    def changed(self) -> None:
        """Something in the status line changed (a state, a problem)."""
        if self.ready:
            self.notifier.status(self._line())

    async def run(self) -> None:
        interval = min(1.0, self.notifier.watchdog_interval_s or 1.0)
        while True:
            failed = self._failed()
            if not self.ready and (self._flowing(1.0) or failed):
                self.ready = True
                self.notifier.ready(self._line())
                log.info("ready: %s", self._line())
            else:
                self.notifier.status(self._line())
            if self.ready and (self._flowing(self._grace_s) or failed):
                self.notifier.watchdog_ping()
            await asyncio.sleep(interval)
