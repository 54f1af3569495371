"""Commands to the running daemon, for root: ``appliance presence arrive|leave``.

The status socket is read-only by design (anyone in the appliance group may read it); commands
go through a second unix socket beside it, ``control.sock``, mode 0600: only the daemon's own
user and root can connect. One request per connection, one JSON line each way:

    {"command": "presence", "action": "arrive"}   →   {"ok": true, "presence": {...}}
    anything wrong                                 →   {"ok": false, "error": "..."}
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

__all__ = ["ControlServer", "control_socket_for", "send_command"]

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def control_socket_for(status_socket: str) -> str:
    return str(Path(status_socket).with_name("control.sock"))


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # never connectable by others, not even for a moment
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                request = json.loads(line)
                handler = self._handlers.get(str(request.get("command")))
                if handler is None:
                    answer = {"ok": False, "error": f"unknown command {request.get('command')!r}"}
                else:
                    answer = handler(request)
            except (ValueError, AttributeError) as exc:
                answer = {"ok": False, "error": f"not a JSON command ({exc})"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def send_command(path: str, request: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one command; raises OSError (PermissionError for a non-root caller)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer: dict[str, Any] = json.loads(b"".join(chunks))
    return answer
