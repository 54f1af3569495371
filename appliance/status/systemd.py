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

import os
import socket
import time

__all__ = ["Notifier"]


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
