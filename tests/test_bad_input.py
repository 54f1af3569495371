"""Bad input: one clear line naming the setting and the fix, and the kiosk keeps going.

Each case runs the real daemon (`appliance run`) as a child process.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from appliance.dev.bench import KioskProcess, write_kiosk_config


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _started(tmp_path: Path, config: Path, env: dict[str, str] | None = None) -> KioskProcess:
    kiosk = KioskProcess(config, tmp_path / "kiosk.log", env=env)
    kiosk.start()
    return kiosk


def _line_with(log: str, *needles: str) -> str:
    for line in log.splitlines():
        if all(n in line for n in needles):
            return line
    raise AssertionError(f"no log line with {needles}:\n{log[-3000:]}")


async def test_missing_model_file(devserver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = write_kiosk_config(tmp_path, url=devserver.url, api_key=devserver.api_key,
                                api_secret=devserver.api_secret,
                                extra='[avatar]\nmodel = "/nonexistent/avatar.json"\n')
    kiosk = await _started(tmp_path, config)
    try:
        status = await kiosk.async_wait_for(lambda s: s["renderer"]["state"] == "failed", 30, "failed")
        line = _line_with(kiosk.log(), "[avatar] model", "/nonexistent/avatar.json")
        assert "—" in line  # and a fix
        assert "/nonexistent/avatar.json" in status["problem"]
        await kiosk.async_wait_for(lambda s: s["room"]["state"] == "live", 30, "joined anyway")
        assert kiosk.proc is not None and kiosk.proc.poll() is None
    finally:
        assert await asyncio.to_thread(kiosk.stop) == 0


async def test_secret_file_readable_by_others(devserver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = write_kiosk_config(tmp_path, url=devserver.url, api_key=devserver.api_key,
                                api_secret=devserver.api_secret)
    (tmp_path / "livekit.secret").chmod(0o644)
    kiosk = await _started(tmp_path, config)
    try:
        status = await kiosk.async_wait_for(lambda s: s["fps_10s"] > 20, 30, "rendered")
        line = _line_with(kiosk.log(), "[livekit] api_secret_file", "chmod 600")
        assert str(tmp_path / "livekit.secret") in line
        assert any("chmod 600" in p for p in status["config_problems"])
        assert status["room"]["state"] is None  # no token, so no room: but warm and saying why
        assert devserver.api_secret not in kiosk.log()
    finally:
        assert await asyncio.to_thread(kiosk.stop) == 0


async def test_wrong_livekit_secret(devserver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = write_kiosk_config(tmp_path, url=devserver.url, api_key=devserver.api_key,
                                api_secret="not-the-right-secret-0123456789abcdef")
    kiosk = await _started(tmp_path, config)
    try:
        status = await kiosk.async_wait_for(lambda s: s["room"]["state"] == "waiting" and s["fps_10s"] > 20,
                                            30, "waited with a warm renderer")
        line = _line_with(kiosk.log(), "refused the token")
        assert "[livekit] api_key / api_secret_file" in line and "—" in line
        assert "refused the token" in status["room"]["reason"]
    finally:
        assert await asyncio.to_thread(kiosk.stop) == 0


async def test_unreachable_server_is_retried(media_host: str, tmp_path: Path) -> None:
    url = f"ws://{media_host}:{_free_port(media_host)}"
    config = write_kiosk_config(tmp_path, url=url, api_key="k", api_secret="s" * 32)
    kiosk = await _started(tmp_path, config)
    try:
        status = await kiosk.async_wait_for(lambda s: s["room"]["state"] == "waiting" and s["fps_10s"] > 20,
                                            30, "waited with a warm renderer")
        assert status["status"].startswith("waiting for network (retry in")
        line = _line_with(kiosk.log(), "[livekit] url: cannot connect to", url)
        assert "check the network" in line
        # it keeps retrying: more than one attempt, with the reason logged once
        await kiosk.async_wait_for(lambda s: "retry in" in (s["room"]["reason"] or ""), 10, "retried")
        assert kiosk.log().count("[livekit] url: cannot connect to") >= 1
    finally:
        assert await asyncio.to_thread(kiosk.stop) == 0


async def test_typo_after_reboot_runs_on_last_good(media_host: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    env = {"STATE_DIRECTORY": str(state)}
    url = f"ws://{media_host}:{_free_port(media_host)}"
    config = write_kiosk_config(tmp_path, url=url, api_key="k", api_secret="s" * 32, room="hall")
    kiosk = await _started(tmp_path, config, env)
    await kiosk.async_wait_for(lambda s: s["fps_10s"] > 0, 30, "rendered")
    assert await asyncio.to_thread(kiosk.stop) == 0
    assert 'room = "hall"' in (state / "last-good.toml").read_text()
    # the operator breaks the file, then the kiosk reboots
    config.write_text(config.read_text().replace('room = "hall"', "room = hall"))
    kiosk = await _started(tmp_path, config, env)
    try:
        status = await kiosk.async_wait_for(lambda s: s["fps_10s"] > 20, 30, "rendered")
        assert status["room"]["name"] == "hall"
        assert any("TOML syntax error" in p for p in status["config_problems"])
        assert "running on the last good configuration" in kiosk.log()
    finally:
        assert await asyncio.to_thread(kiosk.stop) == 0
