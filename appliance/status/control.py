"""Commands to the running daemon, for root: ``appliance presence``, ``appliance say``.

The status socket is read-only by design (anyone in the appliance group may read it); commands
go through a second unix socket beside it, ``control.sock``, mode 0600: only the daemon's own
user and root can connect. One request per connection, one JSON line each way:

    {"command": "presence", "action": "arrive"}   →   {"ok": true, "presence": {...}}
    {"command": "speak", "wav": "<base64>"}        →   {"ok": true, "seconds": 3.2}
    {"command": "speak", "stop": true}             →   {"ok": true, "stopped": true}
    anything wrong                                 →   {"ok": false, "error": "..."}
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.status.server import REQUEST_LIMIT, UnixServer, ask

__all__ = ["ControlServer", "control_socket_for", "send_command"]

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def control_socket_for(status_socket: str) -> str:
    return str(Path(status_socket).with_name("control.sock"))


class ControlServer(UnixServer):
    """Commands for root and the daemon's own user only (0600)."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        super().__init__(path, 0o600)
        self._handlers = handlers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
                request = json.loads(line)
                handler = self._handlers.get(str(request.get("command")))
                if handler is None:
                    answer = {"ok": False, "error": f"unknown command {request.get('command')!r}"}
                else:
                    answer = handler(request)
            except (ValueError, AttributeError) as exc:  # readline: ValueError past the limit
                answer = {"ok": False, "error": f"not a JSON command of at most {REQUEST_LIMIT >> 20} MiB ({exc})"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def send_command(path: str, request: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one command; raises OSError (PermissionError for a non-root caller)."""
    return ask(path, request, timeout_s)
