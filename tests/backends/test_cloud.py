"""The cloud rung's requests, against a fake of bitHuman's cloud API (issue 13).

The fake is checked against what livekit-plugins-bithuman itself sends (its request builder,
run offline against the fake), so the kiosk's requests match the plugin's wire format."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from appliance.backends.cloud import CloudRung, RungFailed
from appliance.config import Secret
from appliance.dev.fake_bithuman import HANG, FakeCloud, Fault

SECRET = "bh-secret-0123456789"
AVATAR_ID = "A12BCD34"


@pytest.fixture
async def cloud(fake_cloud) -> AsyncIterator[FakeCloud]:  # type: ignore[no-untyped-def]
    async with fake_cloud(api_secret=SECRET, spawn_workers=False) as fake:
        yield fake


def rung(fake: FakeCloud, secret: str = SECRET, **timing: float) -> CloudRung:
    return CloudRung(fake.url, AVATAR_ID, "essence-2", Secret(secret, "/etc/appliance/bithuman.secret"), **timing)


async def test_a_session_starts_and_ends_with_the_plugins_request(cloud: FakeCloud) -> None:
    from livekit.agents.utils import http_context
    from livekit.plugins import bithuman

    # what the plugin sends for the same avatar and model (its builder, offline)
    async with http_context.open():  # type: ignore[attr-defined]
        plugin = bithuman.AvatarSession(api_url=cloud.url + "/v1/runtime-tokens/request", api_secret=SECRET,
                                        avatar_id=AVATAR_ID, model="essence-2")
        await plugin._start_cloud_agent("ws://10.0.0.1:7880", "worker-token", "lobby")
    _, plugin_headers, plugin_body = cloud.requests[-1]

    session_id = await rung(cloud).launch("ws://10.0.0.1:7880", "lobby", "worker-token")
    path, headers, body = cloud.requests[-1]
    assert path == "/v1/runtime-tokens/request" and session_id in cloud.sessions
    assert body == plugin_body, (body, plugin_body)  # the same fields, the same values
    assert headers["api-secret"] == plugin_headers["api-secret"] == SECRET
    assert "authorization" not in headers  # the secret goes in api-secret only
    await rung(cloud).end(session_id)
    assert cloud.sessions[session_id].status == "ended"


async def test_503_with_retry_after_is_retried_then_served(cloud: FakeCloud) -> None:
    cloud.script.extend([Fault(503, "SERVICE_UNAVAILABLE", retry_after=0.3)] * 2)
    cloud_rung = rung(cloud)
    started = time.monotonic()
    session_id = await cloud_rung.launch("ws://10.0.0.1:7880", "lobby", "t")
    waited = time.monotonic() - started
    print(f"\n503 x2 with Retry-After 0.3 s: served after {waited:.2f} s, {cloud_rung.attempts} attempts")
    assert session_id and cloud_rung.attempts == 3 and waited >= 0.6


async def test_402_is_not_retried_and_names_the_fix(cloud: FakeCloud) -> None:
    cloud.script.append(Fault(402, "INSUFFICIENT_CREDITS"))
    cloud_rung = rung(cloud)
    with pytest.raises(RungFailed) as refused:
        await cloud_rung.launch("ws://10.0.0.1:7880", "lobby", "t")
    assert cloud_rung.attempts == 1 and not refused.value.retryable
    line = refused.value.operator_line()
    assert line.startswith("[avatar] api_secret_file: bitHuman cloud answered 402 INSUFFICIENT_CREDITS")
    assert "top it up" in line, line


async def test_a_wrong_secret_is_one_refusal(cloud: FakeCloud) -> None:
    cloud_rung = rung(cloud, secret="wrong")
    with pytest.raises(RungFailed) as refused:
        await cloud_rung.launch("ws://10.0.0.1:7880", "lobby", "t")
    assert cloud_rung.attempts == 1 and "401 UNAUTHORIZED" in str(refused.value)


async def test_a_launch_that_hangs_times_out_and_gives_up(cloud: FakeCloud) -> None:
    cloud.script.extend([HANG, HANG, HANG])
    cloud_rung = rung(cloud, attempt_timeout_s=0.5, retry_for_s=2.0)
    started = time.monotonic()
    with pytest.raises(RungFailed) as gave_up:
        await cloud_rung.launch("ws://10.0.0.1:7880", "lobby", "t")
    took = time.monotonic() - started
    print(f"\nhanging launch: gave up after {took:.2f} s, {cloud_rung.attempts} attempts of 0.5 s")
    assert gave_up.value.retryable and "no answer within 0.5 s" in str(gave_up.value)
    assert cloud_rung.attempts == 2 and took < 5


async def test_unreachable_is_retried_then_given_up() -> None:
    cloud_rung = CloudRung("http://127.0.0.1:9", AVATAR_ID, "essence-2", Secret(SECRET, "f"), retry_for_s=1.5)
    with pytest.raises(RungFailed) as gave_up:
        await cloud_rung.launch("ws://10.0.0.1:7880", "lobby", "t")
    assert gave_up.value.retryable and "unreachable" in str(gave_up.value) and cloud_rung.attempts >= 2
