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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.status.problems import KINDS

__all__ = ["REQUEST_LIMIT", "StatusServer", "UnixServer", "ask", "query_status", "format_status"]

REQUEST_LIMIT = 16 * 2**20  # one request line: a minute of speech as base64 WAV fits


class UnixServer:
    """One request per connection on a unix socket, created with ``mode`` from the start
    (the umask closes the moment between bind and chmod) and removed on close."""

    def __init__(self, path: str, mode: int) -> None:
        self.path, self.mode = path, mode
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a killed daemon
        old = os.umask(0o777 & ~self.mode)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                           limit=REQUEST_LIMIT)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class StatusServer(UnixServer):
    """The status JSON to anyone in the socket's group (0660), no request needed."""

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        super().__init__(path, 0o660)
        self._snapshot = snapshot

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self._snapshot(), indent=2).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()


def ask(path: str, request: dict[str, Any] | None = None, timeout_s: float = 3.0) -> dict[str, Any]:
    """Send ``request`` (a JSON line; None: nothing) and read the JSON answer to the end.
    Raises OSError when nothing answers (PermissionError: not allowed to connect)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        if request is not None:
            sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    data: dict[str, Any] = json.loads(b"".join(chunks))
    return data


def query_status(path: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Read the daemon's status; raises OSError when it is not running."""
    return ask(path, None, timeout_s)


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
        + (f"{room.get('state')} ({room.get('reason')})" if room.get("state") else
           "not joining (see the problem below)"),
        f"  fps:      {status.get('fps_10s')} (last 10 s)   uptime: {status.get('uptime_s')} s",
    ]
    hold = status.get("hold")
    if hold and (hold.get("holding") or hold.get("frames_held")):
        lines.append(f"  hold:     {'holding now' if hold.get('holding') else 'not holding'}, "
                     f"{hold.get('frames_held')} hold frames sent (loop: {hold.get('loop')})")
    display = status.get("display")
    if display:
        lines.append(f"  display:  {display.get('summary')}")
    models = status.get("models")
    if models:
        line = f"  models:   {models.get('state')}, current {models.get('current') or 'the [avatar] model'}"
        if models.get("next_check_in_s") is not None:
            line += f", next check in {models['next_check_in_s']:.0f} s"
        lines.append(line)
    lines += audio_lines(status.get("audio"))
    lines += conversation_lines(status.get("presence"), status.get("conversation"))
    for problem in status.get("problems") or []:
        label = _PROBLEM_LABELS.get(problem.get("kind", ""), "problem:  ")
        lines.append(f"  {label}{problem.get('line')}")
    return "\n".join(lines)


def audio_lines(audio: dict[str, Any] | None) -> list[str]:
    """The audio child, the visitor participant, the microphone and the echo canceller."""
    if not audio:
        return []
    visitor = audio.get("visitor") or {}
    aec = audio.get("echo_canceller") or {}
    lines = [
        f"  audio:    child {audio.get('state')} (pid {audio.get('pid')}, {audio.get('restarts')} restarts"
        + (f", last: {audio['last_exit']}" if audio.get("last_exit") else "") + ")",
        f"  visitor:  {visitor.get('identity') or '-'}: {visitor.get('state', 'off')}"
        + (f" ({visitor['reason']})" if visitor.get("reason") else ""),
        f"  mic:      {audio.get('microphone')} (mic_when = {audio.get('mic_when')})",
    ]
    if aec:
        on = [name for name in ("echo_cancellation", "noise_suppression") if aec.get(name)]
        lines.append(f"  echo canceller: {', '.join(on) or 'off'}; stream delay {aec.get('stream_delay_ms')} ms,"
                     f" mic level reduced {aec.get('reduction_db')} dB,"
                     f" {aec.get('cost_ms_per_frame', 0):.3f} ms per 10 ms frame")
    return lines


def conversation_lines(presence: dict[str, Any] | None, conversation: dict[str, Any] | None) -> list[str]:
    """The visitor's presence and the conversation agent dispatched for them."""
    lines = []
    if presence:
        since = presence.get("since")
        ago = f" for {time.time() - since:.0f} s" if since else ""
        if presence.get("present"):
            state = f"a visitor is here{ago} (from {presence.get('source')})"
            if presence.get("ending_in_s") is not None:
                state += f", nobody seen: ends in {presence['ending_in_s']:.0f} s"
        else:
            state = f"nobody{ago}"
        lines.append(f"  presence: {state}; {presence.get('visits')} visits")
    if conversation:
        line = f"  agent:    {conversation.get('summary')}: {conversation.get('state')}"
        if conversation.get("dispatch_id"):
            line += f", dispatch {conversation['dispatch_id']}"
        if conversation.get("agent"):
            line += f", talking with {conversation['agent']}"
        if conversation.get("last_conversation_s") is not None:
            line += f"; last conversation {conversation['last_conversation_s']:.0f} s"
        lines.append(line)
    return lines


# how `appliance status` introduces each kind of problem
_PROBLEM_LABELS = {
    "config": "config:   ",
    "boot-config": "boot config not applied: ",
    "updates": "update problem: ",
    "devices": "device:   ",
    "audio": "audio:    ",
    "agent": "agent:    ",
    "display": "display:  ",
}


class HealthServer:
    """Optional localhost HTTP: /healthz (alive: frames flow), /readyz (serving the room), /metrics.

    Liveness and readiness are kept apart on purpose: a kiosk whose network is
    down is not dead (restarting it would not help), it is only not ready.
    """

    def __init__(self, port: int, snapshot: Callable[[], dict[str, Any]], host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self._snapshot = snapshot
        self._runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: Any) -> Any:
        from aiohttp import web

        status = self._snapshot()
        alive = status["fps_10s"] > 0 or status["renderer"]["state"] == "failed"
        return web.json_response({"alive": alive, "status": status["status"]}, status=200 if alive else 503)

    async def _readyz(self, request: Any) -> Any:
        from aiohttp import web

        status = self._snapshot()
        ready = status["fps_10s"] > 0 and status["room"]["state"] in ("live", "reconnecting")
        return web.json_response({"ready": ready, "status": status["status"]}, status=200 if ready else 503)

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text=prometheus_text(self._snapshot()),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})


def prometheus_text(status: dict[str, Any]) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    renderer, room = status["renderer"], status["room"]
    metrics = [
        ("appliance_up", "gauge", "1 while the supervisor answers", 1),
        ("appliance_uptime_seconds", "gauge", "seconds since the supervisor started", status["uptime_s"]),
        ("appliance_frames_per_second", "gauge", "rendered frames per second over 10 s", status["fps_10s"]),
        ("appliance_frames_published_total", "counter", "frames published in the room (this connection)",
         room["frames_published"]),
        ("appliance_renderer_restarts_total", "counter", "renderer child restarts", renderer["restarts"]),
        ("appliance_frames_held_total", "counter", "hold frames sent while no backend delivered",
         (status.get("hold") or {}).get("frames_held", 0)),
        ("appliance_holding", "gauge", "1 while the tracks and screen show the hold loop",
         int(bool((status.get("hold") or {}).get("holding")))),
        ("appliance_room_connected", "gauge", "1 while live in the room", int(room["state"] == "live")),
        ("appliance_config_problems", "gauge", "problems in the current config files",
         len(status.get("config_problems") or [])),
        ("appliance_model_update_problem", "gauge", "1 while the last model update round failed",
         int(bool((status.get("models") or {}).get("problem")))),
    ]
    backend = status.get("backend") or {}
    if "switches" in backend:  # a fallback ladder is configured
        metrics += [
            ("appliance_backend_remote", "gauge", "1 while a remote rung (gpu, cloud) serves the avatar",
             int(backend["active"] != "local")),
            ("appliance_backend_switches_total", "counter", "hand-overs to a rung and take-backs to local",
             backend["switches"]),
            ("appliance_backend_recover_after_seconds", "gauge",
             "local health needed before the next take-back (doubles while the runtime flaps)",
             backend["recover_after_s"]),
        ]
    audio = status.get("audio")
    if audio:
        visitor, aec = audio.get("visitor") or {}, audio.get("echo_canceller") or {}
        metrics += [
            ("appliance_audio_child_restarts_total", "counter", "audio child restarts", audio["restarts"]),
            ("appliance_visitor_connected", "gauge", "1 while the visitor participant is in the room",
             int(visitor.get("state") == "live")),
            ("appliance_microphone_live", "gauge", "1 while the visitor's microphone track is live (not muted)",
             int(audio.get("microphone") == "live")),
            ("appliance_echo_canceller_enabled", "gauge", "1 while echo cancellation runs",
             int(bool(aec.get("echo_cancellation")))),
            ("appliance_echo_canceller_delay_ms", "gauge", "stream delay given to the echo canceller",
             aec.get("stream_delay_ms") or 0),
            ("appliance_echo_canceller_seconds_total", "counter", "time spent in the echo canceller",
             aec.get("cost_s") or 0),
            ("appliance_audio_child_cpu_seconds_total", "counter", "CPU time of the audio child",
             audio.get("cpu_s") or 0),
        ]
    display = status.get("display")
    if display:
        latency = (display.get("latency_ms") or {}).get("p50")
        metrics += [
            ("appliance_screen_up", "gauge", "1 while the local screen shows the avatar",
             int(display["state"] == "showing")),
            ("appliance_screen_frames_per_second", "gauge", "frames presented on the local screen per second",
             display["fps"]),
            ("appliance_screen_latency_seconds", "gauge",
             "frame handed to the screen to present returned (median over 1 s)",
             latency / 1000 if latency is not None else float("nan")),
            ("appliance_screen_restarts_total", "counter", "screen child restarts", display["restarts"]),
        ]
    presence, conversation = status.get("presence"), status.get("conversation")
    if presence:
        metrics += [
            ("appliance_visitor_present", "gauge", "1 during a visit (motion, button, appliance presence)",
             int(presence["present"])),
            ("appliance_visits_total", "counter", "visits since the supervisor started", presence["visits"]),
        ]
    if conversation:
        came = conversation.get("agent_came_s")
        metrics += [
            ("appliance_agent_present", "gauge", "1 while the agent dispatched by the kiosk is in the room",
             int(conversation.get("agent") is not None)),
            ("appliance_conversations_total", "counter", "agents that came for a dispatch",
             conversation["conversations"]),
            ("appliance_agent_arrival_seconds", "gauge", "dispatch to agent in the room, the last time",
             came if came is not None else float("nan")),
        ]
    problems = status.get("problems") or []
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
    state = renderer["state"] or "stopped"
    lines += ["# HELP appliance_renderer_state the renderer's state (1 for the current one)",
              "# TYPE appliance_renderer_state gauge",
              f'appliance_renderer_state{{state="{state}"}} 1']
    lines += ["# HELP appliance_problems open problems the operator must act on, by part",
              "# TYPE appliance_problems gauge"]
    for kind in KINDS:
        count = sum(1 for p in problems if p.get("kind") == kind)
        lines.append(f'appliance_problems{{kind="{kind}"}} {count}')
    return "\n".join(lines) + "\n"
