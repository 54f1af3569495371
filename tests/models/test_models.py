"""Model store and updater against a local HTTP update server on 127.0.0.1.

Models are generated: reference avatars (JSON variants of the bundled one, loaded with
the real reference runtime's loader to prove they are usable) and random-byte "bithuman"
blobs where the content is never loaded. Every failure case ends with the store's
current model intact and ``list()`` telling the truth.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.models.manifest import (
    DiskFull,
    DownloadError,
    IncompatibleModel,
    ManifestError,
    SignatureError,
    SizeMismatch,
    StoreError,
    TrustedKey,
    VerifyError,
    key_id_of,
    parse_manifest,
    publish,
    sha256_file,
)
from appliance.models.store import FsOps, ModelStore
from appliance.models.updater import (
    Outcome,
    Updater,
    UpdaterSettings,
    UpdateState,
    cmd_models_list,
    cmd_models_rollback,
    cmd_models_update,
    in_window,
    parse_window,
)
from appliance.runtimes.reference import bundled_model_path, load_model

ROOT = Path(__file__).resolve().parents[2]
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TRUSTED = TrustedKey(key_id_of(KEY.public_key()), KEY.public_key())
FAST = UpdaterSettings(connect_timeout_s=2, read_timeout_s=1, retries=2, backoff_s=0.01,
                       backoff_max_s=0.05, min_free_mb=0, chunk_kib=16)


# -- the update server --------------------------------------------------------------


class UpdateServer:
    """Serves files from ``root`` with Range support, plus scripted misbehaviour.

    ``behave[path]`` is a list of actions consumed one per request (the last one
    sticks): "ok", "404", "500", "hang" (no answer), "extra" (more bytes than the
    file, with Content-Length), "extra-chunked" (more bytes, no Content-Length),
    "chunked" (the file, no Content-Length),
    "short" (Content-Length says full, sends half, then closes), "norange" (ignore Range).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.behave: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.throttle: tuple[int, float] | None = None  # (bytes per write, sleep between)
        self.sent: list[int] = []  # body bytes written, per request (same index as requests)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._stopping.set()  # releases "hang" handlers
        if self._runner is not None:
            await self._runner.cleanup()

    def model_requests(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if not r[0].endswith("manifest.json")]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append((path, request.headers.get("Range")))
        index = len(self.sent)
        self.sent.append(0)
        actions = self.behave.get(path, ["ok"])
        action = actions.pop(0) if len(actions) > 1 else actions[0]
        if action in ("404", "500"):
            return web.Response(status=int(action), text=action)
        if action == "hang":
            await self._stopping.wait()
            return web.Response(status=503)
        file = self.root / path.lstrip("/")
        if not file.is_file():
            return web.Response(status=404)
        data = file.read_bytes()
        start = 0
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes=") and action != "norange":
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        if action in ("extra", "extra-chunked"):
            body += os.urandom(4096)
        resp = web.StreamResponse(status=206 if start else 200)
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp.headers["ETag"] = f'"{len(data)}-{hash(data) & 0xffff}"'
        if action not in ("extra-chunked", "chunked"):
            resp.content_length = len(data) - start if action == "short" else len(body)
        await resp.prepare(request)
        if action == "short":
            body = body[: len(body) // 2]
        step, pause = self.throttle or (64 * 1024, 0.0)
        for i in range(0, len(body), step):
            await resp.write(body[i:i + step])
            self.sent[index] += len(body[i:i + step])
            if pause:
                await asyncio.sleep(pause)
        if action == "short":
            request.transport.close()  # type: ignore[union-attr]
            return resp
        await resp.write_eof()
        return resp


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[UpdateServer]:
    srv = UpdateServer(tmp_path / "srv")
    srv.root.mkdir()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def reference_model(tmp_path: Path, name: str, seed: int) -> Path:
    doc = json.loads(Path(bundled_model_path()).read_text())
    doc["name"], doc["seed"] = name, seed
    path = tmp_path / f"src-{name}-{seed}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def blob(tmp_path: Path, size: int, seed: int = 0) -> Path:
    path = tmp_path / f"blob-{seed}-{size}.imx"
    path.write_bytes(os.urandom(size))
    return path


def publish_ref(server: UpdateServer, tmp_path: Path, version: str, **kw: Any) -> Path:
    model = reference_model(tmp_path, "Ada", int(version.replace(".", "")))
    return publish(model, server.root, "", KEY, "lobby", version, "reference", **kw)


def make_updater(root: Path, manifest_url: str, **kw: Any) -> Updater:
    settings = kw.pop("settings", FAST)
    return Updater(ModelStore(root, keep_previous=kw.pop("keep", 1)), manifest_url, [TRUSTED],
                   settings=settings, **kw)


def assert_serving(store: ModelStore, version: str) -> None:
    """The current model is ``version``, complete, and loads in the reference runtime."""
    current = store.current()
    assert current is not None and current.version == version, store.list()
    assert store.verify(version)
    assert current.path is not None
    if current.runtime == "reference":
        load_model(current.path)
        link = store.root / "current" / "model.json"
        assert link.read_bytes() == Path(current.path).read_bytes()
    assert [e.version for e in store.list() if e.state == "current"] == [version]


def states(store: ModelStore) -> dict[str, str]:
    return {e.version: e.state for e in store.list()}


# -- the normal path -------------------------------------------------------------------


async def test_normal_update_stage_activate_and_up_to_date(server: UpdateServer, tmp_path: Path) -> None:
    store_dir = tmp_path / "models"
    publish_ref(server, tmp_path, "1")
    progress: list[tuple[int, int]] = []
    up = make_updater(store_dir, f"{server.url}/manifest.json", progress=lambda d, t: progress.append((d, t)))
    result = await up.check_once()
    assert result.outcome is Outcome.STAGED and result.entry is not None
    assert up.state is UpdateState.STAGED
    assert progress[-1][0] == progress[-1][1] == result.manifest.size
    load_model(result.entry.path or "")  # usable before activation: the supervisor warms it
    assert states(up.store) == {"1": "staged"}
    up.activate("1")
    up.mark_good("1")
    assert_serving(up.store, "1")
    assert (await up.check_once()).outcome is Outcome.UP_TO_DATE

    publish_ref(server, tmp_path, "2")
    result = await up.check_once()
    assert result.outcome is Outcome.STAGED
    entry = up.activate("2")
    assert not entry.confirmed
    up.mark_good("2")
    assert_serving(up.store, "2")
    assert states(up.store) == {"2": "current", "1": "previous"}
    assert os.readlink(store_dir / "previous") == "store/lobby-1"
    assert not list((store_dir / "downloads").glob("*.partial"))
    status = up.status()
    assert status["current"] == "2" and status["previous"] == "1" and status["last_error"] is None


async def test_usb_install_from_a_local_manifest(tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    manifest = publish(reference_model(tmp_path, "Bea", 5), usb, "", KEY, "lobby", "7", "reference")
    up = make_updater(tmp_path / "models", str(manifest))
    result = await up.check_once()
    assert result.outcome is Outcome.STAGED
    up.activate("7")
    assert_serving(up.store, "7")
    # file:// works too, and a larger bithuman blob is streamed in chunks
    big = publish(blob(tmp_path, 300_000), usb, "", KEY, "lobby", "8", "bithuman")
    up2 = make_updater(tmp_path / "models", "file://" + str(big))
    assert (await up2.check_once()).outcome is Outcome.STAGED
    assert up2.activate("8").path.endswith("model.imx")  # type: ignore[union-attr]
    assert up2.store.verify("8")


async def test_older_and_incompatible_manifests_are_ignored(server: UpdateServer, tmp_path: Path) -> None:
    publish_ref(server, tmp_path, "5")
    up = make_updater(tmp_path / "models", f"{server.url}/manifest.json")
    await up.check_once()
    up.activate("5")
    publish_ref(server, tmp_path, "4")  # a replayed, validly signed old manifest
    assert (await up.check_once()).outcome is Outcome.OLDER
    publish_ref(server, tmp_path, "6", min_appliance_version="99.0")
    server.requests.clear()
    with pytest.raises(IncompatibleModel, match="99.0"):
        await up.check_once()
    assert server.model_requests() == []
    assert_serving(up.store, "5")


# -- resume after the process is killed ------------------------------------------------

CHILD = """
import asyncio, sys
from appliance.models.manifest import parse_public_key
from appliance.models.store import ModelStore
from appliance.models.updater import Updater, UpdaterSettings
store, url, key = sys.argv[1:4]
up = Updater(ModelStore(store), url, [parse_public_key(key)],
             settings=UpdaterSettings(chunk_kib=16, min_free_mb=0))
print(asyncio.run(up.check_once()).outcome)
"""


async def test_download_killed_midway_resumes_with_range(server: UpdateServer, tmp_path: Path) -> None:
    size = 2 * 1024 * 1024
    publish(blob(tmp_path, size), server.root, "", KEY, "lobby", "1", "bithuman")
    store_dir = tmp_path / "models"
    server.throttle = (16 * 1024, 0.02)  # ~0.8 MB/s: the kill lands mid-download
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(store_dir), f"{server.url}/manifest.json", TRUSTED.text(),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partials = store_dir / "downloads"
    deadline = time.monotonic() + 30
    while True:
        got = [p.stat().st_size for p in partials.glob("*.partial")] if partials.is_dir() else []
        if got and got[0] > 256 * 1024:
            break
        assert time.monotonic() < deadline, (await proc.communicate())
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    kept = next(partials.glob("*.partial")).stat().st_size
    assert 256 * 1024 < kept < size
    server.throttle = None
    up = make_updater(store_dir, f"{server.url}/manifest.json")
    result = await up.check_once()
    assert result.outcome is Outcome.STAGED
    model_reqs = server.model_requests()
    assert model_reqs[0][1] is None and model_reqs[-1][1] == f"bytes={kept}-"
    assert server.sent[-1] == size - kept  # only the rest was sent
    up.activate("1")
    assert_serving(up.store, "1")


async def test_server_ignoring_range_restarts_cleanly(server: UpdateServer, tmp_path: Path) -> None:
    publish(blob(tmp_path, 200_000), server.root, "", KEY, "lobby", "1", "bithuman")
    server.behave["/lobby-1.imx"] = ["short", "norange"]
    up = make_updater(tmp_path / "models", f"{server.url}/manifest.json")
    assert (await up.check_once()).outcome is Outcome.STAGED
    assert [r[1] is not None for r in server.model_requests()] == [False, True]
    assert up.store.verify("1")


# -- bad bytes, bad signatures, lying sizes ------------------------------------------------


async def _serving_v1(server: UpdateServer, tmp_path: Path) -> Updater:
    publish_ref(server, tmp_path, "1")
    up = make_updater(tmp_path / "models", f"{server.url}/manifest.json")
    await up.check_once()
    up.activate("1")
    up.mark_good("1")
    return up


def _no_leftovers(up: Updater, bad_version: str) -> None:
    assert_serving(up.store, "1")
    assert bad_version not in states(up.store)
    assert not list((up.store.root / "downloads").glob("*.partial"))


async def test_truncated_file_is_refused(server: UpdateServer, tmp_path: Path) -> None:
    up = await _serving_v1(server, tmp_path)
    publish_ref(server, tmp_path, "2")
    model = server.root / "lobby-2.json"
    model.write_bytes(model.read_bytes()[:-100])
    with pytest.raises(SizeMismatch, match="signed size"):
        await up.check_once()
    assert up.state is UpdateState.FAILED and "signed size" in up.status()["last_error"]
    _no_leftovers(up, "2")


async def test_bit_flipped_file_is_refused(server: UpdateServer, tmp_path: Path) -> None:
    up = await _serving_v1(server, tmp_path)
    publish_ref(server, tmp_path, "2")
    model = server.root / "lobby-2.json"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x04
    model.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="does not match the signed"):
        await up.check_once()
    _no_leftovers(up, "2")


async def test_bad_signature_downloads_nothing(server: UpdateServer, tmp_path: Path) -> None:
    up = await _serving_v1(server, tmp_path)
    manifest = publish_ref(server, tmp_path, "2")
    doc = json.loads(manifest.read_text())
    doc["url"] = "http://127.0.0.1:9/elsewhere.json"
    manifest.write_text(json.dumps(doc))
    server.requests.clear()
    with pytest.raises(SignatureError):
        await up.check_once()
    assert server.model_requests() == []
    # signed by a key the kiosk does not trust
    publish(reference_model(tmp_path, "Eve", 1), server.root, "", Ed25519PrivateKey.generate(),
            "lobby", "3", "reference")
    with pytest.raises(SignatureError, match="not trusted"):
        await up.check_once()
    assert server.model_requests() == []
    _no_leftovers(up, "2")


@pytest.mark.parametrize("action", ["extra", "extra-chunked"])
async def test_server_sending_more_than_signed_is_cut_off(server: UpdateServer, tmp_path: Path,
                                                          action: str) -> None:
    up = await _serving_v1(server, tmp_path)
    publish_ref(server, tmp_path, "2")
    server.behave["/lobby-2.json"] = [action]
    with pytest.raises(SizeMismatch, match="more than the signed|signed size"):
        await up.check_once()
    _no_leftovers(up, "2")


async def test_manifest_claiming_more_bytes_than_exist(server: UpdateServer, tmp_path: Path) -> None:
    up = await _serving_v1(server, tmp_path)
    model = reference_model(tmp_path, "Ada", 9)
    manifest = publish(model, server.root, "", KEY, "lobby", "2", "reference")
    doc = json.loads(manifest.read_text())
    doc["size"] += 1000  # the publisher lies (and signs the lie)
    doc.pop("signature")
    from appliance.models.manifest import manifest_bytes, sign_manifest

    manifest.write_bytes(manifest_bytes(sign_manifest(doc, KEY)))
    with pytest.raises(SizeMismatch, match="signed size"):
        await up.check_once()
    _no_leftovers(up, "2")
    # the same lie without a Content-Length: the stream ends early, resuming gets a 416
    server.behave["/lobby-2.json"] = ["chunked", "ok"]
    (server.root / "lobby-2.json").write_bytes(model.read_bytes()[:-10])
    with pytest.raises(SizeMismatch, match="signed size"):
        await up.check_once()
    _no_leftovers(up, "2")


# -- unreliable servers ---------------------------------------------------------------------


async def test_404_and_500_are_retried_then_reported(server: UpdateServer, tmp_path: Path) -> None:
    up = await _serving_v1(server, tmp_path)
    publish_ref(server, tmp_path, "2")
    server.behave["/lobby-2.json"] = ["500"]
    server.requests.clear()
    with pytest.raises(DownloadError, match="HTTP 500") as exc:
        await up.check_once()
    assert "gave up after 3 attempts" in str(exc.value)
    assert len(server.model_requests()) == FAST.retries + 1
    server.behave["/manifest.json"] = ["404"]
    with pytest.raises(ManifestError, match="HTTP 404"):
        await up.check_once()
    assert_serving(up.store, "1")
    # a flaky server that recovers within the retries
    server.behave = {"/lobby-2.json": ["500", "404", "ok"]}
    assert (await up.check_once()).outcome is Outcome.STAGED


async def test_hanging_server_is_bounded_by_timeouts(server: UpdateServer, tmp_path: Path) -> None:
    up = await _serving_v1(server, tmp_path)
    publish_ref(server, tmp_path, "2")
    server.behave["/lobby-2.json"] = ["hang"]
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="Timeout"):
        await asyncio.wait_for(up.check_once(), 30)
    assert time.monotonic() - t0 < (FAST.retries + 1) * (FAST.read_timeout_s + 1) + 2
    server.behave = {"/manifest.json": ["hang"]}
    with pytest.raises(ManifestError, match="Timeout"):
        await asyncio.wait_for(up.check_once(), 30)
    assert_serving(up.store, "1")


async def test_nothing_listening(tmp_path: Path) -> None:
    up = make_updater(tmp_path / "models", "http://127.0.0.1:9/manifest.json")
    with pytest.raises(ManifestError, match="cannot fetch the manifest"):
        await up.check_once()
    assert up.store.list() == []


# -- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_disk_is_refused_before_downloading(server: UpdateServer, tmp_path: Path,
                                                       small_fs: Path) -> None:
    publish(blob(tmp_path, 3 * 1024 * 1024), server.root, "", KEY, "lobby", "1", "bithuman")
    up = make_updater(small_fs / "models", f"{server.url}/manifest.json")
    with pytest.raises(DiskFull) as exc:
        await up.check_once()
    line = exc.value.operator_line()
    assert str(small_fs / "models") in line and "3.0 MiB" in line and "free" in line
    assert server.model_requests() == []
    assert up.store.list() == []


async def test_disk_filling_up_during_download(server: UpdateServer, tmp_path: Path,
                                               small_fs: Path) -> None:
    publish(blob(tmp_path, 1024 * 1024), server.root, "", KEY, "lobby", "1", "bithuman")
    filler = small_fs / "filler"
    filled: list[bool] = []

    def fill(done: int, total: int) -> None:
        if not filled:  # something else eats the disk right after the check
            filled.append(True)
            with open(filler, "wb") as f:
                with pytest.raises(OSError):
                    f.write(os.urandom(2 * 1024 * 1024))

    up = make_updater(small_fs / "models", f"{server.url}/manifest.json", progress=fill)
    with pytest.raises(DiskFull, match="filled up"):
        await up.check_once()
    assert not list((small_fs / "models" / "downloads").glob("*.partial"))  # space given back
    filler.unlink()
    assert (await up.check_once()).outcome is Outcome.STAGED


# -- power cut during the switch -------------------------------------------------------------


class Crash(Exception):
    pass


class CrashAt(FsOps):
    def __init__(self, n: int) -> None:
        self.n, self.count, self.at = n, 0, ""

    def step(self, what: str) -> None:
        self.count += 1
        if self.count == self.n:
            self.at = what
            raise Crash(what)


async def _store_with_v1_current_v2_staged(server: UpdateServer, tmp_path: Path) -> Path:
    up = await _serving_v1(server, tmp_path)
    publish_ref(server, tmp_path, "2")
    assert (await up.check_once()).outcome is Outcome.STAGED
    return up.store.root


def _crash_every_step(base: Path, tmp_path: Path, op: Callable[[ModelStore], object],
                      check: Callable[[ModelStore, bool], None]) -> list[str]:
    """Run ``op`` on a copy of ``base``, crashing at step 1, 2, …; ``check`` each survivor."""
    steps: list[str] = []
    for n in range(1, 100):
        copy = tmp_path / f"crash-{n}"
        shutil.copytree(base, copy, symlinks=True)
        ops = CrashAt(n)
        try:
            op(ModelStore(copy, ops=ops))
            finished = True
        except Crash:
            finished = False
            steps.append(ops.at)
        rebooted = ModelStore(copy)
        check(rebooted, finished)  # before any recovery: what a reader sees at boot
        rebooted.open()
        check(rebooted, finished)
        shutil.rmtree(copy)
        if finished:
            return steps
    raise AssertionError("op never finished")


async def test_power_cut_at_every_step_of_activate(server: UpdateServer, tmp_path: Path) -> None:
    base = await _store_with_v1_current_v2_staged(server, tmp_path)
    seen: set[str] = set()

    def check(store: ModelStore, finished: bool) -> None:
        current = store.current()
        assert current is not None and current.version in ("1", "2")
        seen.add(current.version)
        assert store.verify(current.version)
        load_model(current.path or "")
        # the convenience link is never missing and always names a complete model
        load_model(str(store.root / "current" / "model.json"))
        if current.version == "2":
            assert states(store) == {"2": "current", "1": "previous"}
        else:
            assert states(store)["2"] == "staged"
        if finished:
            assert current.version == "2"

    steps = _crash_every_step(base, tmp_path, lambda s: s.activate("2"), check)
    assert len(steps) >= 4 and seen == {"1", "2"}, steps
    # after a crash the switch can simply be done again
    copy = tmp_path / "again"
    shutil.copytree(base, copy, symlinks=True)
    with pytest.raises(Crash):
        ModelStore(copy, ops=CrashAt(3)).activate("2")
    ModelStore(copy).activate("2")
    assert_serving(ModelStore(copy), "2")


async def test_power_cut_at_every_step_of_staging(server: UpdateServer, tmp_path: Path) -> None:
    up = await _serving_v1(server, tmp_path)
    manifest_path = publish_ref(server, tmp_path, "2")
    m = parse_manifest(manifest_path.read_bytes(), [TRUSTED])
    base = up.store.root

    def stage(store: ModelStore) -> object:
        payload = store.partial_path(m.sha256)
        shutil.copyfile(server.root / "lobby-2.json", payload)
        return store.stage(m, payload)

    def check(store: ModelStore, finished: bool) -> None:
        assert_serving(store, "1")
        got = states(store)
        assert got.get("2") in (None, "staged")
        if got.get("2"):
            assert store.verify("2")
        assert got.get("2") == "staged" or not finished

    steps = _crash_every_step(base, tmp_path, stage, check)
    assert len(steps) >= 5, steps


async def test_power_cut_during_rollback(server: UpdateServer, tmp_path: Path) -> None:
    base = await _store_with_v1_current_v2_staged(server, tmp_path)
    ModelStore(base).activate("2")

    def check(store: ModelStore, finished: bool) -> None:
        current = store.current()
        assert current is not None and store.verify(current.version)
        if finished:
            assert current.version == "1" and states(store)["2"] == "bad"

    _crash_every_step(base, tmp_path, lambda s: s.rollback(), check)


# -- list / rollback / bad models --------------------------------------------------------------


async def test_rollback_marks_bad_and_is_not_retried_until_version_changes(
        server: UpdateServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = await _store_with_v1_current_v2_staged(server, tmp_path)
    store = ModelStore(base)
    store.activate("2")
    assert cmd_models_rollback(str(base)) == 0
    assert "is current again" in capsys.readouterr().out
    assert_serving(store, "1")
    assert states(store) == {"2": "bad", "1": "current"}
    assert cmd_models_rollback(str(base)) == 1  # nothing before 1
    assert "no previous model" in capsys.readouterr().err
    up = make_updater(base, f"{server.url}/manifest.json")
    server.requests.clear()
    result = await up.check_once()
    assert result.outcome is Outcome.BAD and "rolled back by the operator" in result.message
    assert server.model_requests() == []
    publish_ref(server, tmp_path, "3")
    assert (await up.check_once()).outcome is Outcome.STAGED


async def test_staged_model_that_fails_to_load_is_marked_bad(server: UpdateServer, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    up = await _serving_v1(server, tmp_path)
    # validly signed, verifies, but is not a reference avatar: the renderer refuses it
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "something-else"}')
    publish(broken, server.root, "", KEY, "lobby", "2", "reference")
    result = await up.check_once()
    assert result.entry is not None
    with pytest.raises(Exception, match="not a usable reference avatar"):
        load_model(result.entry.path or "")
    now = up.mark_bad("2", "did not load: not a usable reference avatar")
    assert now is not None and now.version == "1"
    assert not (base := up.store.root / "store" / "lobby-2").exists(), base  # space given back
    assert states(up.store) == {"2": "bad", "1": "current"}
    server.requests.clear()
    assert (await up.check_once()).outcome is Outcome.BAD
    assert server.model_requests() == []
    assert cmd_models_list(str(up.store.root)) == 0
    out = capsys.readouterr().out
    assert "bad" in out and "did not load" in out and "current" in out
    assert cmd_models_list(str(up.store.root), as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["version"], e["state"]) for e in listed] == [("2", "bad"), ("1", "current")]
    assert listed[0]["path"] is None and listed[1]["sha256"] == sha256_file(listed[1]["path"])


async def test_trial_model_failing_after_activation_rolls_back(server: UpdateServer, tmp_path: Path) -> None:
    base = await _store_with_v1_current_v2_staged(server, tmp_path)
    store = ModelStore(base)
    entry = store.activate("2")
    assert not entry.confirmed  # on trial: a reboot now would boot 2, and the supervisor judges it
    now = store.mark_bad("2", "no frame within 30 s")
    assert now is not None and now.version == "1" and now.confirmed
    assert_serving(store, "1")


async def test_keep_previous_models(server: UpdateServer, tmp_path: Path) -> None:
    publish_ref(server, tmp_path, "1")
    up = make_updater(tmp_path / "models", f"{server.url}/manifest.json", keep=2)
    for v in ("1", "2", "3", "4"):
        publish_ref(server, tmp_path, v)
        await up.check_once()
        up.activate(v)
        up.mark_good(v)
    assert states(up.store) == {"4": "current", "3": "previous", "2": "kept"}
    assert sorted(p.name for p in (up.store.root / "store").iterdir()) == ["lobby-2", "lobby-3", "lobby-4"]
    up.rollback()
    up.rollback()
    assert states(up.store) == {"4": "bad", "3": "bad", "2": "current"}
    with pytest.raises(StoreError, match="no previous"):
        up.rollback()
    with pytest.raises(StoreError, match="not in the store"):
        up.activate("9")


def test_cmd_models_update_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = publish(reference_model(tmp_path, "Cy", 3), tmp_path / "usb", "", KEY, "lobby", "1",
                       "reference")
    store = str(tmp_path / "models")
    assert cmd_models_update(store, str(manifest), [TRUSTED.text()], settings=FAST) == 0
    assert "staged" in capsys.readouterr().out
    assert cmd_models_update(store, str(manifest), [TRUSTED.text()], settings=FAST, activate=True) == 0
    assert "now current" in capsys.readouterr().out
    assert_serving(ModelStore(store), "1")
    assert cmd_models_update(store, str(manifest), [TRUSTED.text()], settings=FAST) == 0
    assert "is current" in capsys.readouterr().out
    assert cmd_models_update(store, str(tmp_path / "missing.json"), [TRUSTED.text()]) == 1
    assert "cannot read the manifest" in capsys.readouterr().err


# -- policy ---------------------------------------------------------------------------------


def test_update_window() -> None:
    assert in_window(dt.time(3, 0), "02:00-05:00")
    assert not in_window(dt.time(5, 0), "02:00-05:00")
    assert not in_window(dt.datetime(2024, 6, 1, 1, 59), "02:00-05:00")
    assert in_window(dt.time(23, 30), "22:00-02:00") and in_window(dt.time(1, 0), "22:00-02:00")
    assert not in_window(dt.time(12, 0), "22:00-02:00")
    assert in_window(dt.time(12, 0), "")
    assert parse_window(" 02:00 - 05:30 ") == (dt.time(2), dt.time(5, 30))
    for bad in ("2-5", "02:00", "02:00-02:00", "25:00-01:00"):
        with pytest.raises(ValueError):
            parse_window(bad)
