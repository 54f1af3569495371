"""``appliance status``: the supervisor's state over a unix socket.

The daemon listens on ``[status] socket`` (default /run/appliance/status.sock,
inside systemd's RuntimeDirectory). A client connects, the server writes one
JSON document and closes. Nothing secret is ever in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["StatusServer", "query_status", "format_status"]


class StatusServer:
    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a killed daemon
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o660)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self._snapshot(), indent=2).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def query_status(path: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """Read the daemon's status; raises OSError when it is not running."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data: dict[str, Any] = json.loads(b"".join(chunks))
    return data


def format_status(status: dict[str, Any]) -> str:
    renderer, room = status.get("renderer", {}), status.get("room", {})
    lines = [
        f"● {status.get('status')}",
        f"  runtime:  {status.get('runtime')}  model: {status.get('model')}",
        f"  renderer: {renderer.get('state')} (pid {renderer.get('pid')}, "
        f"{renderer.get('restarts')} restarts"
        + (f", last: {renderer.get('last_restart_reason')}" if renderer.get("last_restart_reason") else "")
        + ")",
        f"  room:     {room.get('name')} at {room.get('url')} as {room.get('identity')}: "
        f"{room.get('state')} ({room.get('reason')})",
        f"  fps:      {status.get('fps_10s')} (last 10 s)   uptime: {status.get('uptime_s')} s",
    ]
    if status.get("problem"):
        lines.append(f"  problem:  {status['problem']}")
    return "\n".join(lines)
