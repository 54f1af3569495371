"""The dev server speaks LiveKit's server APIs and the agent worker protocol (issue 12).

* `livekit-api`'s own clients (`LiveKitAPI.room`, `.agent_dispatch`) against the dev server,
  and the grants livekit-server demands (roomCreate, roomList, roomAdmin for that room);
* an unmodified LiveKit Agents worker process (`python worker.py start`, LIVEKIT_URL and the
  key and secret in its environment, an `agent_name`) registers over `/agent`; a dispatch
  brings its agent into the room, deleting the dispatch takes it out;
* rooms close as livekit-server closes them: with only agents left, after departure_timeout.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import DEV_API_KEY, DEV_API_SECRET, DEV_ROOM
from livekit import api, rtc

WORKER = textwrap.dedent('''
    """A plain LiveKit Agents worker: joins its room, says which job it runs, waits."""
    import json, sys
    from livekit.agents import JobContext, WorkerOptions, cli

    async def entrypoint(ctx: JobContext) -> None:
        await ctx.connect()
        print(json.dumps({"job": ctx.job.id, "room": ctx.room.name,
                          "identity": ctx.room.local_participant.identity,
                          "metadata": ctx.job.metadata}), flush=True)

    if __name__ == "__main__":
        # load_fnc: the machine running the tests is busy; the worker must not call itself full
        cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint, agent_name=sys.argv.pop(1),
                                  num_idle_processes=1, load_fnc=lambda *_: 0.0))
''')


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.1)


def http_url(devserver) -> str:  # type: ignore[no-untyped-def]
    return "http" + devserver.url[2:]


@pytest.fixture
async def lkapi(devserver) -> AsyncIterator[api.LiveKitAPI]:  # type: ignore[no-untyped-def]
    client = api.LiveKitAPI(http_url(devserver), DEV_API_KEY, DEV_API_SECRET)
    try:
        yield client
    finally:
        await client.aclose()


async def test_room_and_dispatch_clients_work_against_the_dev_server(devserver, lkapi, make_token) -> None:  # type: ignore[no-untyped-def]
    created = await lkapi.room.create_room(api.CreateRoomRequest(name="hall", departure_timeout=5,
                                                                 metadata="m"))
    assert created.name == "hall" and created.sid.startswith("RM_") and created.departure_timeout == 5
    rooms = await lkapi.room.list_rooms(api.ListRoomsRequest())
    assert [r.name for r in rooms.rooms] == ["hall"]

    kiosk = rtc.Room()
    await kiosk.connect(devserver.url, make_token("kiosk", room="hall"))
    try:
        listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room="hall"))
        assert [p.identity for p in listed.participants] == ["kiosk"]
        dispatch = await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="greeter", room="hall", metadata='{"a": 1}'))
        assert dispatch.id.startswith("AD_") and dispatch.agent_name == "greeter"
        # the room's automatic dispatch (agent_name "", made when it was created) and ours
        listed = {d.agent_name: d.id for d in await lkapi.agent_dispatch.list_dispatch("hall")}
        assert listed.keys() == {"", "greeter"} and listed["greeter"] == dispatch.id, listed
        deleted = await lkapi.agent_dispatch.delete_dispatch(dispatch.id, "hall")
        assert deleted.id == dispatch.id and deleted.state.deleted_at > 0
        assert [d.agent_name for d in await lkapi.agent_dispatch.list_dispatch("hall")] == [""]
        # removing a participant disconnects it, as livekit-server does
        gone = asyncio.Event()
        kiosk.on("disconnected", lambda reason: gone.set())
        await lkapi.room.remove_participant(api.RoomParticipantIdentity(room="hall", identity="kiosk"))
        await asyncio.wait_for(gone.wait(), 10)
    finally:
        await kiosk.disconnect()
    await lkapi.room.delete_room(api.DeleteRoomRequest(room="hall"))
    assert (await lkapi.room.list_rooms(api.ListRoomsRequest())).rooms == []


async def test_bad_grants_are_refused_as_livekit_server_refuses_them(devserver) -> None:  # type: ignore[no-untyped-def]
    wrong = api.LiveKitAPI(http_url(devserver), DEV_API_KEY, "not-the-secret-0123456789abcdef0")
    try:
        with pytest.raises(api.TwirpError) as refused:
            await wrong.room.list_rooms(api.ListRoomsRequest())
        assert refused.value.code == "unauthenticated" and refused.value.status == 401
    finally:
        await wrong.aclose()

    async def call(method: str, body: dict[str, object], grants: api.VideoGrants) -> tuple[int, dict]:
        token = api.AccessToken(DEV_API_KEY, DEV_API_SECRET).with_identity("ops").with_grants(grants).to_jwt()
        async with aiohttp.ClientSession() as http, http.post(
                f"{http_url(devserver)}/twirp/livekit.{method}", json=body,
                headers={"Authorization": f"Bearer {token}"}) as answer:
            return answer.status, await answer.json()

    # a participant's join grant is no admin grant; roomAdmin for another room is none for this one
    status, error = await call("AgentDispatchService/CreateDispatch", {"room": DEV_ROOM, "agent_name": "x"},
                               api.VideoGrants(room_admin=True, room="elsewhere"))
    assert (status, error["code"]) == (403, "permission_denied"), error
    status, error = await call("RoomService/ListParticipants", {"room": DEV_ROOM},
                               api.VideoGrants(room_join=True, room=DEV_ROOM))
    assert (status, error["code"]) == (403, "permission_denied"), error
    status, error = await call("RoomService/CreateRoom", {"name": "x"}, api.VideoGrants(room_list=True))
    assert (status, error["code"]) == (403, "permission_denied"), error
    # JSON bodies work too, with the grant
    status, answer = await call("RoomService/CreateRoom", {"name": "x", "empty_timeout": 7},
                                api.VideoGrants(room_create=True))
    assert status == 200 and answer["name"] == "x" and answer["empty_timeout"] == 7, answer
    status, error = await call("RoomService/MutePublishedTrack", {"room": "x"},
                               api.VideoGrants(room_admin=True, room="x"))
    assert (status, error["code"]) == (501, "unimplemented"), error


async def test_a_room_of_agents_alone_closes_after_departure_timeout(devserver, lkapi, make_token) -> None:  # type: ignore[no-untyped-def]
    await lkapi.room.create_room(api.CreateRoomRequest(name="lobby-x", departure_timeout=1))
    avatar, visitor = rtc.Room(), rtc.Room()
    closed = asyncio.Event()
    avatar.on("disconnected", lambda reason: closed.set())
    await avatar.connect(devserver.url, make_token("avatar", room="lobby-x", kind="agent"))
    await visitor.connect(devserver.url, make_token("visitor", room="lobby-x"))
    try:
        await asyncio.sleep(2.0)  # the visitor keeps the room open
        assert not closed.is_set()
        await visitor.disconnect()
        await asyncio.wait_for(closed.wait(), 10)  # the agent alone: closed ~1 s later
        assert "lobby-x" not in devserver.rooms
    finally:
        await avatar.disconnect()
        await visitor.disconnect()


@pytest.fixture
def worker(devserver, tmp_path: Path) -> Callable[[str], subprocess.Popen[str]]:  # type: ignore[no-untyped-def]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    started: list[subprocess.Popen[str]] = []

    def start(agent_name: str) -> subprocess.Popen[str]:
        env = dict(os.environ, LIVEKIT_URL=devserver.url, LIVEKIT_API_KEY=DEV_API_KEY,
                   LIVEKIT_API_SECRET=DEV_API_SECRET)
        proc = subprocess.Popen([sys.executable, str(script), agent_name, "start"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in started:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_an_unmodified_worker_registers_and_is_dispatched(devserver, lkapi, worker, make_token) -> None:  # type: ignore[no-untyped-def]
    proc = worker("greeter")
    await until(lambda: bool(devserver.agents.registered("greeter")), 60, "the worker registered")
    kiosk = rtc.Room()
    await kiosk.connect(devserver.url, make_token("kiosk"))
    joined: list[rtc.RemoteParticipant] = []
    left = asyncio.Event()
    kiosk.on("participant_connected", joined.append)
    kiosk.on("participant_disconnected", lambda p: left.set())
    try:
        asked = time.monotonic()
        dispatch = await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name="greeter", room=DEV_ROOM, metadata='{"visitor": "v"}'))
        await until(lambda: bool(joined), 20, "the agent joined")
        arrived_s = time.monotonic() - asked
        agent = joined[0]
        print(f"dispatch → agent in the room: {arrived_s:.2f} s")
        assert agent.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        assert agent.attributes.get("lk.agent.name") == "greeter", agent.attributes
        [listed] = [d for d in await lkapi.agent_dispatch.list_dispatch(DEV_ROOM) if d.id == dispatch.id]
        [job] = listed.state.jobs
        assert job.dispatch_id == dispatch.id and job.state.participant_identity == agent.identity
        await lkapi.agent_dispatch.delete_dispatch(dispatch.id, DEV_ROOM)
        await asyncio.wait_for(left.wait(), 20)  # the job was terminated: the agent left
        # a dispatch for a name no worker has: created, but nobody comes
        await lkapi.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name="nobody",
                                                                                  room=DEV_ROOM))
        await asyncio.sleep(2.0)
        assert len(joined) == 1
    finally:
        await kiosk.disconnect()
    assert proc.poll() is None, "the worker died"
