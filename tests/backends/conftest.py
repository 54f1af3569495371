"""A fake of bitHuman's cloud API for the backend tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from appliance.dev.fake_bithuman import FakeCloud

FakeCloudFactory = Callable[..., AbstractAsyncContextManager[FakeCloud]]


@pytest.fixture
def fake_cloud() -> FakeCloudFactory:
    """``async with fake_cloud(api_secret=..., host=...) as cloud``: started, stopped after."""
    @asynccontextmanager
    async def started(**options: object) -> AsyncIterator[FakeCloud]:
        fake = FakeCloud(**options)  # type: ignore[arg-type]
        await fake.start()
        try:
            yield fake
        finally:
            await fake.stop()

    return started
