"""A LiveKit room and a shell for a kiosk booted under QEMU (tests/test_image.py).

``GuestShell`` is what an operator does with the image's SSH: a key pair made for the test
(its public half goes onto the boot partition as ``authorized_keys``) and ``ssh kiosk@...``
through QEMU's port forward.

``GuestRoom`` runs the dev server and a token endpoint (the ``[livekit] token_url`` request
the kiosk documents: ``GET /token?room=..&identity=..&kind=..``) on an address of the test's
private network namespace, in an event loop of their own on a thread, so that they serve while
the boot test blocks on QEMU. The guest
reaches them through QEMU's user-mode network (``open_network``), which in this namespace
reaches nothing else. No secret goes onto the image: the kiosk fetches its tokens.

"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from appliance.auth import AVATAR, VISITOR, MintedTokens
from appliance.config.schema import Secret
from appliance.dev.server import DevServer

T = TypeVar("T")

API_KEY = "guestkey"
API_SECRET = "guest-secret-0123456789abcdef0123456789"


class GuestRoom:
    """The dev server and a token endpoint on ``host``, served from a thread's event loop."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.token_requests: list[tuple[str, str]] = []  # (identity, kind) as asked
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="guest-room", daemon=True)
        self._thread.start()
        self.server = DevServer(host=host, port=0, api_key=API_KEY, api_secret=API_SECRET)
        self.call(self.server.start())
        self._runner = web.AppRunner(self._token_app())
        self.call(self._runner.setup())
        site = web.TCPSite(self._runner, host, 0)
        self.call(site.start())
        self.token_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token_url(self) -> str:
        return f"http://{self.host}:{self.token_port}/token"

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Run ``coro`` on the room's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def _token_app(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            query = request.query
            identity, kind = query.get("identity", ""), query.get("kind", "")
            self.token_requests.append((identity, kind))
            role = AVATAR if kind == "agent" else VISITOR
            minted = MintedTokens(api_key=API_KEY, api_secret=Secret(API_SECRET, "test"),
                                  room=query.get("room", ""), identity=identity, ttl_s=3600, role=role)
            return web.json_response({"token": await minted.token(), "ttl_s": 3600})

        app = web.Application()
        app.router.add_get("/token", token)
        return app

    def close(self) -> None:
        self.call(self._runner.cleanup())
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GuestShell:
    """``ssh kiosk@127.0.0.1 -p port`` with a key made for this test."""

    def __init__(self, directory: Path, port: int) -> None:
        self.key = directory / "id_ed25519"
        self.port = port
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "image-test",
                        "-f", str(self.key)], check=True)
        self.public_key = self.key.with_suffix(".pub").read_text()

    def run(self, command: str, stdin: bytes = b"", timeout_s: float = 120.0) -> str:
        done = subprocess.run(
            ["ssh", "-i", str(self.key), "-p", str(self.port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=60", "-o", "LogLevel=ERROR", "kiosk@127.0.0.1", command],
            input=stdin, capture_output=True, timeout=timeout_s)
        assert done.returncode == 0, f"guest: {command!r} failed ({done.returncode}): {done.stderr.decode()}"
        return done.stdout.decode()
