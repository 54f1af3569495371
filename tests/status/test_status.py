"""`appliance status` over the unix socket, and the optional /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.status.server import HealthServer, StatusServer, format_status, prometheus_text


def snapshot(room_state: str = "waiting", fps: float = 25.0) -> dict[str, Any]:
    return {
        "status": "waiting for network (retry in 4 s) · reference warm · 25.0 fps",
        "uptime_s": 12.5, "runtime": "reference", "model": "/m.json", "fps_10s": fps,
        "renderer": {"state": "running", "pid": 42, "restarts": 1, "last_restart_reason": "child 41 died"},
        "room": {"name": "lobby", "url": "ws://x", "identity": "kiosk", "state": room_state,
                 "reason": "cannot connect", "frames_published": 0},
        "config_problems": ["a.toml:2: [livekit] room: got 3"], "problem": None,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unix_socket_and_cli(tmp_path: Path) -> None:
    path = str(tmp_path / "status.sock")
    server = StatusServer(path, snapshot)
    await server.start()
    try:
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "appliance", "status", "--socket", path],
            capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout == format_status(snapshot()) + "\n"
        assert "renderer: running (pid 42, 1 restarts, last: child 41 died)" in result.stdout
    finally:
        await server.close()
    gone = subprocess.run([sys.executable, "-m", "appliance", "status", "--socket", path],
                          capture_output=True, text=True)
    assert gone.returncode == 1 and "not running" in gone.stderr


async def test_liveness_and_readiness_are_apart() -> None:
    state = {"room": "waiting"}
    port = free_port()
    health = HealthServer(port, lambda: snapshot(state["room"]))
    await health.start()
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            async with session.get(f"{base}/healthz") as r:
                assert r.status == 200  # offline but rendering: alive
            async with session.get(f"{base}/readyz") as r:
                assert r.status == 503  # not serving the room
            state["room"] = "live"
            async with session.get(f"{base}/readyz") as r:
                assert r.status == 200
            async with session.get(f"{base}/metrics") as r:
                text = await r.text()
                assert r.headers["Content-Type"].startswith("text/plain")
        assert "appliance_renderer_restarts_total 1" in text
        assert "appliance_room_connected 1" in text
        assert 'appliance_renderer_state{state="running"} 1' in text
    finally:
        await health.close()


def test_prometheus_text_is_well_formed() -> None:
    for line in prometheus_text(snapshot()).splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
        else:
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.split("{")[0].startswith("appliance_")


@pytest.mark.parametrize("value", ["-1", "0", "abc", "inf"])
def test_a_bad_status_timeout_is_one_line_naming_the_option(value: str) -> None:
    done = subprocess.run([sys.executable, "-m", "appliance", "status", "--timeout", value],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert f"argument --timeout: got '{value}', expected seconds from 0 to 3600, e.g. --timeout 10" in done.stderr
