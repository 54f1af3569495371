"""A fake of bitHuman's self-hosted GPU container (``sgubithuman/expression-avatar``, port
8089), for tests: its documented HTTP API (facts in shared/facts/fallback-facts.md, A3, D2).

    GET  /health                 200 {status "healthy", service, active_sessions, max_sessions}
    GET  /ready                  200 {status "ready", model_ready, …}; 503 {status "not_ready"}
                                 for ``warmup_s`` after start, 503 {status "at_capacity"} when full
    POST /launch                 multipart (or the plugin's JSON) livekit_url, livekit_token,
                                 room_name, [avatar_image | avatar_image_url], model, async_mode
                                 → {status "pending", task_id, room_name}; 400 without a field
    GET  /tasks/{id}             {task_id, room_name, status pending|running|completed|cancelled}
    POST /tasks/{id}/stop        the worker leaves, the slot is free

Each task is a remote-worker process (``remote_worker.py``, tag ``gpu``) that joins with exactly
the token it was sent. ``script`` holds faults for the next /launch requests (``Fault``, ``HANG``);
``idle_timeout_s`` is the container's ``SESSION_IDLE_TIMEOUT`` (passed to the worker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from appliance.dev.fake_bithuman import HANG, Fault, spawn_worker

log = logging.getLogger("appliance.dev.fake_gpu")

__all__ = ["FakeGpu", "GpuTask"]


@dataclass
class GpuTask:
    id: str
    fields: dict[str, str]
    image: bytes | None
    worker: subprocess.Popen[bytes] | None
    status: str = "running"


@dataclass
class FakeGpu:
    host: str = "127.0.0.1"
    port: int = 0
    warmup_s: float = 0.0
    max_sessions: int = 8
    idle_timeout_s: float = 0.0
    script: deque[Fault] = field(default_factory=deque)
    worker_args: list[str] = field(default_factory=list)
    spawn_workers: bool = True  # False: answer as the container would, but start no worker
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, path, headers
    tasks: dict[str, GpuTask] = field(default_factory=dict)

    async def start(self) -> None:
        self._stopping, self._started = asyncio.Event(), time.monotonic()
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_post("/launch", self._launch)
        app.router.add_get("/tasks/{id}", self._task)
        app.router.add_post("/tasks/{id}/stop", self._stop)
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
        for task in self.tasks.values():
            self._end(task, "cancelled")
        await self._runner.cleanup()

    def _record(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path, {k.lower(): v for k, v in request.headers.items()}))

    def _active(self) -> int:
        for task in self.tasks.values():
            if task.status == "running" and task.worker is not None and task.worker.poll() is not None:
                task.status = "completed"  # its worker left (idle timeout, crash)
        return sum(1 for task in self.tasks.values() if task.status == "running")

    def _not_ready(self) -> str | None:
        if time.monotonic() - self._started < self.warmup_s:
            return "not_ready"
        if self._active() >= self.max_sessions:
            return "at_capacity"
        return None

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"status": "healthy", "service": "expression-avatar",
                                  "active_sessions": self._active(), "max_sessions": self.max_sessions})

    async def _ready(self, request: web.Request) -> web.Response:
        self._record(request)
        why = self._not_ready()
        if why is not None:
            return web.json_response({"status": why}, status=503)
        active = self._active()
        return web.json_response({"status": "ready", "model_ready": True, "active_sessions": active,
                                  "available_sessions": self.max_sessions - active, "max_sessions": self.max_sessions})

    async def _launch(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        fields: dict[str, str] = {}
        image: bytes | None = None
        if request.content_type == "application/json":  # the plugin's form since 1.4.2
            try:
                body = await request.json()
            except json.JSONDecodeError:
                body = None
            if not isinstance(body, dict):
                return web.json_response({"detail": "invalid JSON"}, status=400)
            fields = {k: str(v) for k, v in body.items()}
        else:
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    if key == "avatar_image":
                        image = value.file.read()
                else:
                    fields[key] = str(value)
        if self.script:
            fault = self.script.popleft()
            if fault is HANG:
                await self._stopping.wait()
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            return web.json_response({"status": fault.code, "detail": f"fault injected: {fault.code}"},
                                     status=fault.status, headers=headers)
        missing = [k for k in ("livekit_url", "livekit_token", "room_name") if not fields.get(k)]
        if missing:
            return web.json_response({"detail": f"missing: {', '.join(missing)}"}, status=400)
        if image is not None and not image.startswith((b"\x89PNG", b"\xff\xd8")):
            return web.json_response({"detail": "avatar_image is not a JPEG or PNG"}, status=400)
        why = self._not_ready()
        if why is not None:
            return web.json_response({"status": why}, status=503)
        args = [*self.worker_args, *(["--idle-timeout-s", f"{self.idle_timeout_s:g}"] if self.idle_timeout_s else [])]
        worker = spawn_worker(fields["livekit_url"], fields["livekit_token"], "gpu", args) if self.spawn_workers else None
        task = GpuTask(uuid.uuid4().hex, fields, image, worker)
        self.tasks[task.id] = task
        log.info("GPU task %s for room %s", task.id, fields["room_name"])
        return web.json_response({"status": "pending", "task_id": task.id, "room_name": fields["room_name"]})

    def _end(self, task: GpuTask, status: str) -> None:
        if task.status == "running":
            task.status = status
        if task.worker is not None and task.worker.poll() is None:
            task.worker.terminate()

    async def _task(self, request: web.Request) -> web.Response:
        self._record(request)
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            return web.json_response({"detail": "task not found"}, status=404)
        self._active()
        return web.json_response({"task_id": task.id, "room_name": task.fields.get("room_name"), "status": task.status})

    async def _stop(self, request: web.Request) -> web.Response:
        self._record(request)
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            return web.json_response({"detail": "task not found"}, status=404)
        self._end(task, "cancelled")
        return web.json_response({"task_id": task.id, "status": task.status})
