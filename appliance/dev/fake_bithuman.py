"""A fake of bitHuman's cloud avatar API, for tests: what a caller that is not the
LiveKit plugin sees (bitHuman's "cloud avatar" page; facts in shared/facts/fallback-facts.md).

    POST /v1/runtime-tokens/request   header api-secret, JSON {mode, model, agent_id,
                                      livekit_url, livekit_token, room_name}
                                      → 200 {avatar_session_started, session_id "cs_…", …}
    POST /v1/runtime-sessions/{id}/end → {session_id, status "ended", ended, slot_released, …}
    GET  /v1/runtime-sessions/{id}     → {session_id, status starting|live|ended}

Each session is a remote-worker process (``remote_worker.py``) that joins the room with
exactly the ``livekit_token`` it was sent. Errors use bitHuman's envelope
``{"error": {"code", "message", "httpStatus"}, "status": "error", "status_code"}``.

Faults, for the ladder's tests: ``script`` is a queue of what the next launch requests get
instead of a session (``Fault(503, "SERVICE_UNAVAILABLE", retry_after=1)``, ``Fault(402,
"INSUFFICIENT_CREDITS")``, ``HANG``: accept and never answer); ``worker_args`` adds remote
worker flags (``--crash-after-s 2``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("appliance.dev.fake_bithuman")

__all__ = ["HANG", "Fault", "FakeCloud", "CloudSession", "spawn_worker"]


@dataclass(frozen=True)
class Fault:
    status: int
    code: str
    retry_after: float | None = None


HANG = Fault(0, "HANG")  # accept the request, never answer


@dataclass
class CloudSession:
    id: str
    body: dict[str, Any]
    worker: subprocess.Popen[bytes] | None
    status: str = "live"


def spawn_worker(url: str, token: str, tag: str, args: list[str]) -> subprocess.Popen[bytes]:
    """A remote-worker process joining with exactly ``token`` (never on its command line)."""
    return subprocess.Popen([sys.executable, "-m", "appliance.dev.remote_worker", "--url", url, "--tag", tag, *args],
                            env={**os.environ, "LIVEKIT_TOKEN": token})


def _error(status: int, code: str, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    return web.json_response({"error": {"code": code, "message": message, "httpStatus": status},
                              "status": "error", "status_code": status}, status=status, headers=headers)


@dataclass
class FakeCloud:
    api_secret: str
    host: str = "127.0.0.1"
    port: int = 0
    script: deque[Fault] = field(default_factory=deque)
    worker_args: list[str] = field(default_factory=list)
    spawn_workers: bool = True  # False: answer as bitHuman would, but start no worker
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    sessions: dict[str, CloudSession] = field(default_factory=dict)

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/runtime-tokens/request", self._request)
        app.router.add_post("/v1/runtime-sessions/{id}/end", self._end)
        app.router.add_get("/v1/runtime-sessions/{id}", self._get)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        self._stopping.set()
        for session in self.sessions.values():
            self._end_worker(session)
        await self._runner.cleanup()

    def _authorized(self, request: web.Request) -> web.Response | None:
        secret = request.headers.get("api-secret")
        if not secret:
            return _error(401, "MISSING_AUTH", "the api-secret header is missing")
        if secret != self.api_secret:
            return _error(401, "UNAUTHORIZED", "invalid api-secret")
        return None

    async def _request(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()}, body or {}))
        refused = self._authorized(request)
        if refused is not None:
            return refused
        if not isinstance(body, dict):
            return _error(400, "VALIDATION_ERROR", "the endpoint takes JSON only")
        if self.script:
            fault = self.script.popleft()
            if fault is HANG:
                await self._stopping.wait()  # until the caller gives up (or the fake stops)
            return _error(fault.status, fault.code, f"fault injected: {fault.code}", fault.retry_after)
        if "mode" not in body:  # a runtime token only, no avatar
            return web.json_response({"data": {"token": uuid.uuid4().hex}, "transaction_id": uuid.uuid4().hex})
        missing = [k for k in ("livekit_url", "livekit_token", "room_name") if not body.get(k)]
        if not body.get("agent_id") and not body.get("image"):
            missing.append("agent_id")
        if missing or body["mode"] not in ("cpu", "gpu"):
            return _error(400, "VALIDATION_ERROR", f"missing or invalid: {', '.join(missing) or 'mode'}")
        session = CloudSession(f"cs_{uuid.uuid4().hex[:16]}", body, self._spawn(body))
        self.sessions[session.id] = session
        log.info("cloud session %s for room %s", session.id, body["room_name"])
        return web.json_response({"avatar_session_started": True, "model": body.get("model") or "essence-2",
                                  "session_id": session.id, "mode": body["mode"],
                                  "agent_id": body.get("agent_id"), "image": None, "user_id": "u_fake"})

    def _spawn(self, body: dict[str, Any]) -> subprocess.Popen[bytes] | None:
        if not self.spawn_workers:
            return None
        return spawn_worker(body["livekit_url"], body["livekit_token"], "cloud", self.worker_args)

    def _end_worker(self, session: CloudSession) -> None:
        session.status = "ended"
        if session.worker is not None and session.worker.poll() is None:
            session.worker.terminate()

    def _session(self, request: web.Request) -> CloudSession | web.Response:
        """The session the path names, or the refusal to answer."""
        self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()}, {}))
        refused = self._authorized(request)
        if refused is not None:
            return refused
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _error(404, "NOT_FOUND", "no such session (or not yours)")
        return session

    async def _end(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if isinstance(session, web.Response):
            return session
        already = session.status == "ended"
        self._end_worker(session)
        return web.json_response({"session_id": session.id, "status": "ended", "billed_seconds": 1,
                                  "credits": 0.1, "ended": True, "slot_released": True,
                                  "note": "already ended" if already else ""})

    async def _get(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if isinstance(session, web.Response):
            return session
        if session.worker is not None and session.worker.poll() is not None:
            session.status = "ended"
        return web.json_response({"session_id": session.id, "status": session.status})
