"""A conversation agent arrives with each visitor and leaves after them (issue 12).

Real parts only: the dev server (in this process), an agent worker process built on an
unmodified livekit-agents (the bundled example agent, `python -m appliance.dev.example_agent
start`, with LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET and its agent_name; it
registers over /agent), the kiosk (`appliance run`), a viewer that watches and listens to the
kiosk, and `appliance presence arrive|leave` as an operator types it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.dev.bench import KioskProcess, write_kiosk_config
from appliance.dev.demo import Viewer, make_token
from appliance.dev.example_agent import AGENT_NAME
from appliance.runtimes.reference import mouth_box_for, mouth_open_fraction
from appliance.status.server import prometheus_text
from appliance.supervisor import bundled_model

KIOSK = "kiosk-visit"
ROOM = "lobby"
ABSENT_S = 3.0


def presence(kiosk: KioskProcess, action: str) -> str:
    done = subprocess.run([sys.executable, "-m", "appliance", "presence", action, "--socket", kiosk.socket],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def explicit(devserver) -> list:  # type: ignore[no-untyped-def]
    """The room's dispatches the kiosk made (not the automatic one of the room's creation)."""
    return [d for d in devserver.agents.dispatches.values() if d.info.room == ROOM and d.info.agent_name]


@pytest.fixture
def example_worker(devserver) -> Iterator[subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    env = dict(os.environ, LIVEKIT_URL=devserver.url, LIVEKIT_API_KEY=devserver.api_key,
               LIVEKIT_API_SECRET=devserver.api_secret)
    proc = subprocess.Popen([sys.executable, "-m", "appliance.dev.example_agent", "start"], env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def worker_registered(devserver) -> None:  # type: ignore[no-untyped-def]
    """Until the example agent's worker process has registered with the dev server."""
    deadline = time.monotonic() + 60
    while not devserver.agents.registered(AGENT_NAME):
        assert time.monotonic() < deadline, "the example agent's worker never registered"
        await asyncio.sleep(0.2)


async def start_kiosk(devserver, tmp_path: Path, agent: str) -> KioskProcess:  # type: ignore[no-untyped-def]
    config = write_kiosk_config(tmp_path, url=devserver.url, api_key=devserver.api_key,
                                api_secret=devserver.api_secret, room=ROOM, identity=KIOSK,
                                extra=f"[agent]\n{agent}\n")
    kiosk = KioskProcess(config, tmp_path / "kiosk.log")
    kiosk.start()
    await kiosk.async_wait_for(lambda s: s["room"]["state"] == "live" and s["fps_10s"] > 0
                               and (s["audio"]["visitor"] or {}).get("state") == "live", 60, "went live")
    return kiosk


@pytest.fixture
async def stopping() -> AsyncIterator[list[KioskProcess]]:
    kiosks: list[KioskProcess] = []
    yield kiosks
    for kiosk in kiosks:
        code = await asyncio.to_thread(kiosk.stop)
        assert code == 0, f"kiosk did not stop cleanly ({code}):\n{kiosk.log()[-3000:]}"


async def test_each_visitor_gets_a_fresh_agent_that_leaves_after_them(
        devserver, example_worker, tmp_path: Path, stopping) -> None:  # type: ignore[no-untyped-def]
    await worker_registered(devserver)
    kiosk = await start_kiosk(devserver, tmp_path, f'name = "{AGENT_NAME}"\nend_after_absent_s = {ABSENT_S}')
    stopping.append(kiosk)
    viewer = Viewer(KIOSK)
    await viewer.connect(devserver.url, make_token(devserver.api_key, devserver.api_secret, ROOM, "viewer",
                                                   hidden=True))
    await asyncio.wait_for(viewer.video_started.wait(), 20)
    assert not explicit(devserver), "a dispatch before anyone arrived"
    box = mouth_box_for(bundled_model(), 512, 512)
    jobs = []
    for visit in (1, 2):
        arrived = time.monotonic()
        print(f"\nvisit {visit}: {presence(kiosk, 'arrive').strip()}")
        status = await kiosk.async_wait_for(lambda s: s["conversation"]["agent"] is not None, 20,
                                            "an agent joined for the visitor")
        in_room_s = time.monotonic() - arrived
        [dispatch] = explicit(devserver)  # exactly one for the visit
        [job] = dispatch.jobs
        jobs.append(job.id)
        assert status["conversation"]["agent"] == job.state.participant_identity, status["conversation"]
        assert status["presence"]["present"] and status["conversation"]["dispatch_id"] == dispatch.info.id
        metrics = prometheus_text(status)
        assert "appliance_visitor_present 1" in metrics and "appliance_agent_present 1" in metrics
        # the greeting: heard by the viewer, and the avatar's mouth moves with it
        while not any(t > arrived and np.abs(a).max() > 3000 for a, t in zip(viewer.audio, viewer.audio_times,
                                                                               strict=True)):
            assert time.monotonic() - arrived < 30, "the viewer never heard the greeting"
            await asyncio.sleep(0.05)
        first_word = next(t for a, t in zip(viewer.audio, viewer.audio_times, strict=True)
                          if t > arrived and np.abs(a).max() > 3000)
        await asyncio.sleep(1.5)
        mouth = max(mouth_open_fraction(f.image, box) for f in viewer.frames if f.at > first_word)
        print(f"visit {visit}: presence → agent in the room {in_room_s:.2f} s, → first word of the greeting "
              f"at the viewer {first_word - arrived:.2f} s; mouth open {mouth:.3f} while greeting")
        assert in_room_s < 5.0, f"the agent took {in_room_s:.1f} s to join"
        assert mouth > 0.06, "the avatar's mouth did not move with the greeting"
        # the visitor leaves: after end_after_absent_s the dispatch is deleted and the agent leaves
        left = time.monotonic()
        presence(kiosk, "leave")
        status = await kiosk.async_wait_for(lambda s: s["conversation"]["dispatch_id"] is None
                                            and s["agent"] is None, ABSENT_S + 20, "the agent left")
        gone_s = time.monotonic() - left
        print(f"visit {visit}: leave → agent gone {gone_s:.2f} s (end_after_absent_s = {ABSENT_S:g})")
        assert gone_s >= ABSENT_S - 0.5
        assert not explicit(devserver)
        assert status["conversation"]["last_conversation_s"] > 0 and not status["presence"]["present"]
    assert jobs[0] != jobs[1], "the second visitor got the first visitor's job"
    await viewer.close()


async def test_an_agent_name_no_worker_has_is_one_problem_and_the_kiosk_keeps_serving(
        devserver, tmp_path: Path, stopping) -> None:  # type: ignore[no-untyped-def]
    kiosk = await start_kiosk(devserver, tmp_path, 'name = "no-such-agent"\njoin_timeout_s = 2.0\nend_after_absent_s = 1.0')
    stopping.append(kiosk)
    presence(kiosk, "arrive")
    status = await kiosk.async_wait_for(
        lambda s: any(p["kind"] == "agent" for p in s["problems"]), 20, "the missing agent was reported")
    [problem] = [p for p in status["problems"] if p["kind"] == "agent"]
    assert problem["setting"] == "[agent] name", problem
    assert "'no-such-agent'" in problem["line"] and "no agent joined" in problem["line"], problem
    assert "agent_name 'no-such-agent'" in problem["fix"], problem
    assert status["room"]["state"] == "live" and status["fps_10s"] > 10
    assert status["presence"]["present"] and status["conversation"]["state"] == "waiting for the agent"
    presence(kiosk, "leave")  # presence is still tracked: the visit ends, the dispatch goes
    await kiosk.async_wait_for(lambda s: s["conversation"]["dispatch_id"] is None
                               and not any(p["kind"] == "agent" for p in s["problems"]), 90, "the visit ended")


async def test_always_keeps_one_agent_and_replaces_it_when_its_job_ends(
        devserver, example_worker, tmp_path: Path, stopping) -> None:  # type: ignore[no-untyped-def]
    from livekit import api

    await worker_registered(devserver)
    kiosk = await start_kiosk(devserver, tmp_path, f'name = "{AGENT_NAME}"\ndispatch = "always"')
    stopping.append(kiosk)
    # nobody is here, and yet an agent comes: one dispatch, all the time
    first = (await kiosk.async_wait_for(lambda s: s["conversation"]["agent"] is not None, 20,
                                        "an agent joined"))["conversation"]
    assert not (await asyncio.to_thread(kiosk.status))["presence"]["present"]
    [dispatch] = explicit(devserver)
    # an operator (or a crash) ends its job: the kiosk dispatches a fresh one
    lkapi = api.LiveKitAPI("http" + devserver.url[2:], devserver.api_key, devserver.api_secret)
    try:
        await lkapi.agent_dispatch.delete_dispatch(dispatch.info.id, ROOM)
    finally:
        await lkapi.aclose()
    second = (await kiosk.async_wait_for(
        lambda s: s["conversation"]["agent"] not in (None, first["agent"]), 30, "a fresh agent joined"))["conversation"]
    assert second["dispatch_id"] != first["dispatch_id"] and len(explicit(devserver)) == 1
    print(f"always: agent {first['agent']} replaced by {second['agent']}")
