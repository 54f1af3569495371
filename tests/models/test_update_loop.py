"""The model-update loop never ends of one bad input.

A running ``ModelUpdates.run()`` task is fed garbage, huge, deeply nested and truncated
manifests (from a file path and over HTTP from a server on 127.0.0.1) and a store whose
filesystem fails with EIO, ENOSPC or EACCES (the OSError injected at the store's durable
steps). After each, the task is still alive, the updater is FAILED (not "checking"), the
problem names the manifest or the store and the fix, and a good manifest published next
is still picked up and goes live. Last, the same through a real Supervisor's status.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.config import load_config, parse_layers
from appliance.models.manifest import TrustedKey, key_id_of, publish
from appliance.models.rollout import ModelUpdates
from appliance.models.store import FsOps, ModelEntry
from appliance.models.updater import UpdaterSettings, UpdateState
from appliance.status.server import format_status
from appliance.supervisor import Supervisor

AVATAR = Path(str(resources.files("appliance") / "data" / "reference-avatar.json"))
AVATAR_B = Path(str(resources.files("appliance") / "data" / "reference-avatar-b.json"))
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
PUBLIC = TrustedKey(key_id_of(KEY.public_key()), KEY.public_key()).text()
FIX = "point [models] manifest_url at the manifest.json"


async def until(what: str, check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Served:
    """Bytes served at /manifest.json and files from ``root``; ``cut`` promises more than it sends."""

    def __init__(self, root: Path) -> None:
        self.root, self.manifest, self.cut, self.url = root, b"", False, ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/manifest.json":
            return web.FileResponse(self.root / request.path.lstrip("/"))
        resp = web.StreamResponse()
        resp.content_length = len(self.manifest) * (2 if self.cut else 1)
        await resp.prepare(request)
        for i in range(0, len(self.manifest), 16 * 1024):  # in pieces: the reader must gather them
            await resp.write(self.manifest[i:i + 16 * 1024])
            await asyncio.sleep(0)
        if self.cut:
            request.transport.close()  # type: ignore[union-attr]
        else:
            await resp.write_eof()
        return resp


class Loop:
    """A ModelUpdates whose run() task is live, swapping through a recording callback."""

    def __init__(self, tmp_path: Path, manifest_url: str, served: Path) -> None:
        self.served, self.swaps, self.healthy = served, [], [True]
        config = parse_layers([("t.toml", f"""
[models]
directory = "{tmp_path / 'models'}"
manifest_url = "{manifest_url}"
public_key = "{PUBLIC}"
warmup_timeout_s = 5.0
""")])
        self.updates = ModelUpdates(config, swap=self.swap, is_idle=lambda: True,
                                    healthy=lambda: self.healthy[0])
        self.task = asyncio.create_task(self.updates.run(), name="model-updates")

    async def swap(self, entry: ModelEntry | None, deadline_s: float) -> str | None:
        self.swaps.append(entry.version if entry else "configured")
        return None

    def publish(self, version: str) -> bytes:
        model = AVATAR if int(version) % 2 else AVATAR_B
        return publish(model, self.served, "", KEY, "lobby", version, "reference").read_bytes()

    async def round_ends(self, what: str, check: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Check now, and wait for a round that ends with ``check()`` true."""
        before = self.updates.next_check_at  # set anew when a round ends
        self.updates.check_now()
        await until(what, lambda: self.updates.next_check_at != before and check(), timeout_s)

    async def refused(self, *needles: str) -> str:
        """Check now; the round fails, saying all of ``needles``; the task lives on."""
        await self.round_ends(f"a problem with {needles}",
                              lambda: self.updates.updater.state is UpdateState.FAILED
                              and all(n in self.updates.problem for n in needles))
        assert not self.task.done(), self.task
        assert self.updates.updater.state is UpdateState.FAILED
        status = self.updates.status()
        assert status["problem"] == self.updates.problem and " — " in status["problem"]
        assert status["state"] == "failed" and status["next_check_in_s"] is not None
        return self.updates.problem

    async def goes_live(self, version: str) -> None:
        await self.round_ends(f"model {version} live", lambda: not self.updates.problem and (
            (c := self.updates.store.current()) is not None and c.version == version and c.confirmed))
        assert not self.task.done() and self.swaps[-1] == version

    async def close(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.models.rollout.SOAK_S", 0.2)
    monkeypatch.setattr("appliance.models.rollout.RETRY_S", 0.05)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Served]:
    srv = Served(tmp_path / "served")
    srv.root.mkdir()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def bad_manifests(good: bytes) -> list[tuple[str, bytes, str]]:
    """(what, bytes, what the problem must say)"""
    return [
        ("60 KB of [", b"[" * 60_000, "nested more than 16 levels deep"),
        ("deep objects", b'{"a":' * 10_000, "nested more than 16 levels deep"),
        ("huge", b" " * (5 * 1024 * 1024) + good, "larger than 64 KiB"),
        ("garbage", bytes(range(256)) * 16, "not UTF-8"),
        ("truncated", good[: len(good) // 2], "(truncated, or not JSON)"),
        ("empty", b"", "the file is empty"),
        ("a list", b"[1, 2, 3]", "a JSON list, not an object"),
        ("unsigned", good.replace(b'"signature"', b'"signed_by_no_one"'), "is not signed"),
    ]


async def test_bad_manifests_from_a_file_never_end_the_loop(tmp_path: Path) -> None:
    served = tmp_path / "usb"
    loop = Loop(tmp_path, str(served / "manifest.json"), served)
    try:
        good = loop.publish("1")
        await loop.goes_live("1")
        for what, raw, says in bad_manifests(loop.publish("2")):
            (served / "manifest.json").write_bytes(raw)
            line = await loop.refused(says, str(served / "manifest.json"))
            assert FIX in line or "sign" in line, (what, line)
        assert good and loop.updates.store.current().version == "1"  # type: ignore[union-attr]
        loop.publish("3")
        await loop.goes_live("3")
    finally:
        await loop.close()


async def test_bad_manifests_over_http_never_end_the_loop(tmp_path: Path, server: Served) -> None:
    loop = Loop(tmp_path, f"{server.url}/manifest.json", server.root)
    loop.updates.updater.settings = UpdaterSettings(retries=0, connect_timeout_s=2, read_timeout_s=2)
    try:
        server.manifest = loop.publish("1")
        await loop.goes_live("1")
        good = loop.publish("2")
        for what, raw, says in bad_manifests(good):
            server.manifest = raw
            line = await loop.refused(says, f"{server.url}/manifest.json")
            assert FIX in line or "sign" in line, (what, line)
        server.manifest, server.cut = good, True  # the connection drops halfway
        await loop.refused("cannot fetch the manifest", "ClientPayloadError")
        server.cut = False
        await loop.goes_live("2")
    finally:
        await loop.close()


# -- a store whose filesystem fails ------------------------------------------------------


class Failing(FsOps):
    """Raises ``OSError(err)`` at every durable step whose description contains ``where``."""

    def __init__(self) -> None:
        self.err: int | None = None
        self.where = ""

    def step(self, what: str) -> None:
        if self.err is not None and self.where in what:
            raise OSError(self.err, os.strerror(self.err))


FIXES = {errno.EIO: "journalctl -k", errno.ENOSPC: "free space", errno.EACCES: "chown -R appliance"}


@pytest.mark.parametrize("err", list(FIXES), ids=errno.errorcode.get)
async def test_store_failures_never_end_the_loop(tmp_path: Path, err: int) -> None:
    served = tmp_path / "usb"
    loop = Loop(tmp_path, str(served / "manifest.json"), served)
    ops = Failing()
    loop.updates.store.ops = ops
    try:
        # staging fails: nothing changes, the problem names the store, the error and the fix
        ops.err, ops.where = err, ""
        loop.publish("1")
        line = await loop.refused(os.strerror(err), FIXES[err], "[models] directory")
        assert f"model store {loop.updates.store.root}: {os.strerror(err)}" in line
        assert loop.swaps == [] and loop.updates.store.current() is None
        # staged, warmed and swapped, but the switch cannot be recorded: back to what served
        ops.where = "state.json"
        await loop.refused(os.strerror(err), FIXES[err])
        assert loop.swaps == ["1", "configured"]
        assert loop.updates.store.current() is None and loop.updates.store.get("1").state == "staged"  # type: ignore[union-attr]
        # the disk is fixed: the same model is tried again and goes live
        ops.err = None
        await loop.goes_live("1")
    finally:
        await loop.close()


async def test_a_bad_model_the_store_cannot_record_still_goes_back(tmp_path: Path) -> None:
    served = tmp_path / "usb"
    loop = Loop(tmp_path, str(served / "manifest.json"), served)
    ops = Failing()
    loop.updates.store.ops = ops
    try:
        loop.publish("1")
        await loop.goes_live("1")
        loop.publish("2")
        ops.err, ops.where = errno.EIO, "bad.json"
        loop.healthy[0] = False  # model 2 stops rendering during its soak
        await loop.refused("Input/output error", "journalctl -k")
        assert loop.swaps[-2:] == ["2", "1"]  # the avatar went back at once
        # the disk recovers: the next round records it, so the store agrees with the screen
        ops.err = None
        await loop.round_ends("model 2 recorded bad", lambda: not loop.updates.problem)
        assert loop.updates.store.bad_reason("2") is not None
        assert loop.updates.store.current().version == "1"  # type: ignore[union-attr]
        assert loop.swaps[-2:] == ["2", "1"] and not loop.task.done()
    finally:
        await loop.close()


async def test_unreadable_store_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    served = tmp_path / "usb"
    loop = Loop(tmp_path, str(served / "manifest.json"), served)
    try:
        loop.publish("1")
        await loop.goes_live("1")

        def unreadable() -> list[ModelEntry]:
            raise OSError(errno.EIO, "Input/output error", str(loop.updates.store.root / "store"))

        loop.updates.store.list = unreadable  # type: ignore[method-assign]
        loop.publish("2")
        await loop.refused("Input/output error", "journalctl -k")
        assert loop.updates.status()["current"] is None  # status answers, and says why
        del loop.updates.store.list
        await loop.goes_live("2")
    finally:
        await loop.close()


def test_backoff_grows_to_the_check_interval(tmp_path: Path) -> None:
    config = parse_layers([("t.toml", f'[models]\nmanifest_url = "/x"\npublic_key = "{PUBLIC}"\n'
                                      f'directory = "{tmp_path}"\ncheck_interval_s = 600\n')])
    updates = ModelUpdates(config, swap=None, is_idle=lambda: True, healthy=lambda: True)  # type: ignore[arg-type]
    delays = []
    for failures in range(8):
        updates.failures = failures
        delays.append(updates.retry_delay())
    assert delays == [600, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]  # RETRY_S patched to 0.05
    updates.failures = 40
    assert updates.retry_delay() == 600


# -- what `appliance status` shows, from a real supervisor ---------------------------------


async def test_supervisor_status_names_the_problem_and_picks_up_a_good_manifest(tmp_path: Path) -> None:
    served = tmp_path / "usb"
    served.mkdir()
    (served / "manifest.json").write_bytes(b"[" * 60_000)
    path = tmp_path / "appliance.toml"
    path.write_text(f"""
[status]
socket = "{tmp_path}/s.sock"
[models]
directory = "{tmp_path / 'models'}"
manifest_url = "{served / 'manifest.json'}"
public_key = "{PUBLIC}"
warmup_timeout_s = 20.0
""")
    sup = Supervisor(load_config([path]), load=lambda: load_config([path]))
    await sup.start()
    try:
        assert sup.updates is not None
        await until("the problem in status",
                    lambda: "nested" in ((sup.status()["models"] or {}).get("problem") or ""))
        status = sup.status()
        assert status["models"]["state"] == "failed"
        text = format_status(status)
        assert f"update problem: [models] manifest_url: {served / 'manifest.json'} is not a manifest" in text
        assert FIX in text
        assert sup._updates_task is not None and not sup._updates_task.done()
        publish(AVATAR_B, served, "", KEY, "lobby", "1", "reference")
        sup.updates.check_now()
        await until("model 1 live", lambda: (sup.status()["models"] or {}).get("current") == "1"
                    and sup.spec is not None and sup.spec.model.endswith("model.json"), 60)
        await until("a clean round", lambda: sup.status()["models"]["problem"] is None, 30)
        assert sup.frames_flowing(2.0)
    finally:
        await sup.close()
