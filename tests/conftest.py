"""Shared test setup: a private network namespace for media, and a LiveKit dev server.

* When running as root, `pytest_configure` moves the whole test process into a
  fresh network namespace (`appliance/netns.py`, shared with the benchmark) before anything starts a thread, so
  libwebrtc (livekit FFI), aiortc and every child process live in it: they can
  reach `lo` and the namespace's own veth addresses, and nothing else.  The
  namespace is removed in `pytest_unconfigure`.  Not root: tests that ask for
  `media_host` are skipped, saying why.
* `async def` tests run on asyncio through anyio's pytest plugin (no marker needed).
* Fixtures: `media_host` (address to bind media servers to; skips without a
  namespace), `signal_host` (namespace address, else 127.0.0.1: for tests that
  need no media), `devserver` (a started `DevServer` on `media_host` with
  `DEV_API_KEY` / `DEV_API_SECRET`), `make_token` (mints a token for it).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable

import pytest

from appliance.dev import netns

DEV_API_KEY = "devkey"
DEV_API_SECRET = "test-secret-0123456789abcdef0123456789"
DEV_ROOM = "test-room"

_netns: netns.Netns | None = None
_netns_error = ""


def pytest_configure(config: pytest.Config) -> None:
    global _netns, _netns_error
    ok, why = netns.available()
    if not ok:
        _netns_error = why
        return
    try:
        ns = netns.create()
    except Exception as exc:  # e.g. a container without CAP_SYS_ADMIN
        _netns_error = f"could not create a network namespace: {exc}"
        return
    try:
        netns.enter(ns)
    except Exception as exc:
        netns.remove(ns)
        _netns_error = f"could not enter the network namespace: {exc}"
        return
    _netns = ns


def pytest_unconfigure(config: pytest.Config) -> None:
    global _netns
    if _netns is not None:
        netns.remove(_netns)
        _netns = None


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    # Mark `async def` tests for anyio before anyio's own hook looks at them, so they
    # get the `anyio_backend` fixture (and mix with @pytest.mark.parametrize).
    if (
        isinstance(collector, pytest.Module | pytest.Class)
        and collector.istestfunction(obj, name)
        and inspect.iscoroutinefunction(obj)
        and not any(m.name == "anyio" for m in getattr(obj, "pytestmark", []))
    ):
        pytest.mark.anyio(obj)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def media_host() -> str:
    """An address inside the test's own network namespace, for media servers."""
    if _netns is None:
        pytest.skip(_netns_error or "no network namespace for media tests")
    return _netns.host_a


@pytest.fixture
def signal_host() -> str:
    """Where a signalling-only server can listen: the namespace if any, else loopback."""
    return _netns.host_a if _netns is not None else "127.0.0.1"


@pytest.fixture
async def devserver(media_host: str) -> AsyncIterator:
    """A started LiveKit dev server on `media_host`, with DEV_API_KEY/DEV_API_SECRET."""
    from appliance.dev.server import DevServer

    server = DevServer(host=media_host, port=0, api_key=DEV_API_KEY, api_secret=DEV_API_SECRET)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def make_token() -> Callable[..., str]:
    """make_token(identity, room=DEV_ROOM, kind=None, attributes=None, metadata="", ...)"""
    from livekit import api

    def make(
        identity: str,
        room: str = DEV_ROOM,
        *,
        kind: str | None = None,
        name: str = "",
        attributes: dict[str, str] | None = None,
        metadata: str = "",
        secret: str = DEV_API_SECRET,
        key: str = DEV_API_KEY,
        hidden: bool = False,
    ) -> str:
        token = (
            api.AccessToken(key, secret)
            .with_identity(identity)
            .with_name(name or identity)
            .with_grants(api.VideoGrants(room_join=True, room=room, can_update_own_metadata=True,
                                         hidden=hidden))
        )
        if kind:
            token = token.with_kind(kind)  # type: ignore[arg-type]
        if attributes:
            token = token.with_attributes(attributes)
        if metadata:
            token = token.with_metadata(metadata)
        return token.to_jwt()

    return make


@pytest.fixture
def fake_cloud():  # type: ignore[no-untyped-def]
    """``async with fake_cloud(api_secret=..., host=...) as cloud``: a fake of bitHuman's cloud
    API (appliance/dev/fake_bithuman.py), started, and stopped after."""
    from contextlib import asynccontextmanager

    from appliance.dev.fake_bithuman import FakeCloud

    @asynccontextmanager
    async def started(**options):  # type: ignore[no-untyped-def]
        fake = FakeCloud(**options)
        await fake.start()
        try:
            yield fake
        finally:
            await fake.stop()

    return started
