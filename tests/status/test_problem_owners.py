"""Every owner of a problem raises it, `appliance status --json` shows it under ``problems``
with the setting and the fix, and the owner dismisses it once the cause is fixed, while
the others stay (issue 10).

A real supervisor (reference avatar, real renderer child) runs in this process; status is
read with the real CLI over the real socket. Its defaults have no LiveKit credentials, so a
room problem ("no way to get a join token") stands throughout: the one that must stay.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.config import boot as boot_config
from appliance.config import load_config
from appliance.models.manifest import TrustedKey, key_id_of, publish
from appliance.supervisor import Supervisor

MODEL = str(resources.files("appliance") / "data" / "reference-avatar.json")
ROOM_PROBLEM = "[livekit] api_key / api_secret_file / token_url"


class Kiosk:
    """A running supervisor on ``dir``'s appliance.toml, and `appliance status --json`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "appliance.toml"
        self.socket = directory / "status.sock"
        self.sup: Supervisor | None = None
        self._run: asyncio.Task[None] | None = None

    def write(self, body: str) -> None:
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(f'[status]\nsocket = "{self.socket}"\n{body}')
        tmp.replace(self.conf)

    async def start(self) -> None:
        self.sup = Supervisor(load_config([self.conf]), load=lambda: load_config([self.conf]))
        self._run = asyncio.create_task(self.sup.run())
        await until("the status socket", lambda: self.socket.exists(), 30)
        # The room link raises its problem once it first tries to join, which on a busy
        # machine can be after the socket answers: the tests start from it standing.
        await self.wait_problems("room", True)

    async def reload(self) -> None:
        assert self.sup is not None
        await self.sup.reload("test")

    async def status(self) -> dict[str, Any]:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "appliance", "status", "--json", "--socket",
                             str(self.socket)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    async def problems(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in (await self.status())["problems"] if p["kind"] == kind]

    async def wait_problems(self, kind: str, present: bool, timeout_s: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.problems(kind)
            if bool(found) == present:
                return found
            assert time.monotonic() < deadline, f"{kind} problems still {found!r}"
            await asyncio.sleep(0.3)

    async def stop(self) -> None:
        if self.sup is not None and self._run is not None:
            self.sup.request_stop()
            await asyncio.wait_for(self._run, 30)


async def until(what: str, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def kiosk(tmp_path: Path) -> AsyncIterator[Kiosk]:
    k = Kiosk(tmp_path)
    k.write("")
    yield k
    await k.stop()


async def assert_room_problem_stays(kiosk: Kiosk) -> None:
    room = await kiosk.problems("room")
    assert len(room) == 1 and room[0]["setting"] == ROOM_PROBLEM, room
    assert room[0]["fix"] == "set api_key and api_secret_file, or token_url"


async def test_config_problem(kiosk: Kiosk) -> None:
    await kiosk.start()
    kiosk.write('[avatar]\nstall_timeout_s = "soon"\n')
    await kiosk.reload()
    [problem] = await kiosk.wait_problems("config", True)
    assert problem["setting"] == "[avatar] stall_timeout_s", problem
    assert problem["fix"] and problem["line"].startswith(f"{kiosk.conf}:")
    await assert_room_problem_stays(kiosk)
    kiosk.write("")
    await kiosk.reload()
    await kiosk.wait_problems("config", False)
    await assert_room_problem_stays(kiosk)


async def test_renderer_problem_when_the_model_cannot_open(kiosk: Kiosk) -> None:
    missing = kiosk.dir / "no-such-avatar.json"
    kiosk.write(f'[avatar]\nmodel = "{missing}"\n')
    await kiosk.start()
    [problem] = await kiosk.wait_problems("renderer", True)
    assert problem["setting"] == "[avatar] model" and problem["fix"], problem
    assert str(missing) in problem["line"]
    await assert_room_problem_stays(kiosk)
    kiosk.write(f'[avatar]\nmodel = "{MODEL}"\n')
    await kiosk.reload()
    await kiosk.wait_problems("renderer", False)
    assert (await kiosk.status())["renderer"]["state"] == "running"
    await assert_room_problem_stays(kiosk)


async def test_room_problem_with_credentials_then_joined(tmp_path: Path, devserver) -> None:  # type: ignore[no-untyped-def]
    kiosk = Kiosk(tmp_path)
    secret = tmp_path / "livekit-secret"
    secret.write_text("not-the-secret-0123456789abcdef0123456789")
    secret.chmod(0o600)
    kiosk.write(f'[livekit]\nurl = "{devserver.url}"\napi_key = "{devserver.api_key}"\n'
                f'api_secret_file = "{secret}"\nretry_max_s = 2.0\n')
    try:
        await kiosk.start()
        [problem] = await kiosk.wait_problems("room", True)
        assert problem["setting"] == "[livekit] api_key / api_secret_file", problem
        assert problem["fix"] == "check that the key and secret match the server's"
        assert "refused the token" in problem["line"]
        secret.write_text(devserver.api_secret)
        await kiosk.reload()  # the secret changed: rejoin
        await kiosk.wait_problems("room", False)
        assert (await kiosk.status())["room"]["state"] == "live"
    finally:
        await kiosk.stop()


async def test_device_problem(kiosk: Kiosk) -> None:
    kiosk.write('[audio]\nspeaker = "no-such-speaker-card"\n')
    await kiosk.start()
    # the speaker belongs to the audio child: its problems are kind "audio"
    [problem] = await kiosk.wait_problems("audio", True)
    assert problem["setting"] == "[audio] speaker" and problem["fix"], problem
    await assert_room_problem_stays(kiosk)
    kiosk.write('[audio]\nspeaker = ""\n')
    await kiosk.reload()
    await kiosk.wait_problems("audio", False)
    await assert_room_problem_stays(kiosk)


async def test_boot_import_problem(kiosk: Kiosk, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = kiosk.dir / "problems.txt"
    refused.write_text(
        "/boot/firmware/appliance.toml NOT applied (3); the kiosk keeps its current configuration:\n"
        "/boot/firmware/appliance.toml:4: [livekit] retry_max_s: got 'soon', expected a number"
        " — write a number of seconds, e.g. 10\n")
    monkeypatch.setattr(boot_config, "REFUSED_IMPORT", refused)
    await kiosk.start()
    [problem] = await kiosk.wait_problems("boot-config", True)
    assert problem["setting"] == "[livekit] retry_max_s", problem
    assert problem["fix"] == "write a number of seconds, e.g. 10"
    assert problem["line"].startswith("/boot/firmware/appliance.toml:4: [livekit] retry_max_s: got 'soon'")
    await assert_room_problem_stays(kiosk)
    refused.unlink()  # the next boot imported a fixed file
    await kiosk.reload()
    await kiosk.wait_problems("boot-config", False)
    await assert_room_problem_stays(kiosk)


async def test_updates_problem(kiosk: Kiosk) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(3, 35)))
    public = TrustedKey(key_id_of(key.public_key()), key.public_key()).text()
    served = kiosk.dir / "updates"
    served.mkdir()
    manifest = served / "manifest.json"
    manifest.write_text("[" * 60_000)  # garbage where the manifest should be
    kiosk.write(f'[models]\nmanifest_url = "{manifest}"\npublic_key = "{public}"\n'
                f'directory = "{kiosk.dir / "models"}"\n')
    await kiosk.start()
    [problem] = await kiosk.wait_problems("updates", True)
    assert problem["setting"] == "[models] manifest_url" and problem["fix"], problem
    assert str(manifest) in problem["line"]
    await assert_room_problem_stays(kiosk)
    publish(MODEL, served, "", key, "lobby", "2", "reference")  # a good manifest replaces it
    await kiosk.reload()  # `appliance models update --now` does this
    await kiosk.wait_problems("updates", False)
    await assert_room_problem_stays(kiosk)
