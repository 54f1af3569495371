"""Which agent the kiosk serves, and how it says so.

The kiosk (``appliance run``) joins as kind agent with ``lk.publish_on_behalf``
set to a placeholder; the conversation agent it serves is the newest agent-kind
participant that is nobody's avatar. Speech from any other agent is not played.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from livekit import api, rtc

from appliance.auth import NO_AGENT_YET, PUBLISH_ON_BEHALF
from appliance.dev.bench import KioskProcess, write_kiosk_config
from appliance.dev.demo import AgentVoice, make_token, read_wav

KIOSK = "kiosk-served"
ROOM = "lobby"


@pytest.fixture
async def kiosk(devserver, tmp_path: Path) -> AsyncIterator[KioskProcess]:  # type: ignore[no-untyped-def]
    config = write_kiosk_config(tmp_path, url=devserver.url, api_key=devserver.api_key,
                                api_secret=devserver.api_secret, room=ROOM, identity=KIOSK)
    process = KioskProcess(config, tmp_path / "kiosk.log")
    process.start()
    try:
        await process.async_wait_for(lambda s: s["room"]["state"] == "live", 60, "went live")
        yield process
    finally:
        code = await asyncio.to_thread(process.stop)
        assert code == 0, f"kiosk did not stop cleanly ({code}):\n{process.log()[-3000:]}"


async def test_the_kiosk_serves_the_newest_conversation_agent_only(  # type: ignore[no-untyped-def]
    devserver, kiosk: KioskProcess
) -> None:
    key, secret = devserver.api_key, devserver.api_secret
    observer = rtc.Room()
    await observer.connect(devserver.url, make_token(key, secret, ROOM, "observer"), rtc.RoomOptions(auto_subscribe=False))
    seen = observer.remote_participants[KIOSK]
    assert seen.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    assert seen.attributes[PUBLISH_ON_BEHALF] == NO_AGENT_YET

    def served(identity: str) -> bool:
        return seen.attributes.get(PUBLISH_ON_BEHALF) == identity

    first, second = AgentVoice(KIOSK), AgentVoice(KIOSK)
    worker = rtc.Room()  # another avatar (say a remote rendering worker): kind agent, on behalf of someone
    try:
        await first.connect(devserver.url, make_token(key, secret, ROOM, "agent-1", agent=True))
        await _until(lambda: served("agent-1"), "the kiosk serves agent-1")
        await kiosk.async_wait_for(lambda s: s["agent"] == "agent-1", 10, "status names agent-1")

        worker_token = (api.AccessToken(key, secret).with_identity("avatar-worker").with_kind("agent")
                        .with_attributes({PUBLISH_ON_BEHALF: KIOSK})
                        .with_grants(api.VideoGrants(room_join=True, room=ROOM)).to_jwt())
        await worker.connect(devserver.url, worker_token)
        await asyncio.sleep(1.0)
        assert served("agent-1"), f"an avatar worker was taken for the conversation agent: {seen.attributes}"

        await second.connect(devserver.url, make_token(key, secret, ROOM, "agent-2", agent=True))
        await _until(lambda: served("agent-2"), "the kiosk serves the newer agent-2")
        await kiosk.async_wait_for(lambda s: s["agent"] == "agent-2", 10, "status names agent-2")

        pcm, rate = read_wav()
        short = pcm[: rate]
        await first.say(short, rate)  # not the agent served: not played, never acknowledged
        await asyncio.sleep(2.0)
        assert not first.finished_event.is_set(), "speech from an agent the kiosk does not serve was played"
        await second.say(short, rate)
        await asyncio.wait_for(second.finished_event.wait(), 10)
        assert second.finished[-1][1] is False, second.finished

        await second.close()
        await _until(lambda: served("agent-1"), "agent-1 served again once agent-2 left")
        await first.close()
        await _until(lambda: served(NO_AGENT_YET), "the placeholder once no agent is left")
        await kiosk.async_wait_for(lambda s: s["agent"] is None, 10, "status: no agent")
    finally:
        for room in (first.room, second.room, worker, observer):
            await room.disconnect()


async def _until(probe, what: str, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.1)
