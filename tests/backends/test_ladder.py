"""The fallback ladder end to end: the local runtime stops serving, bitHuman's cloud (a fake
of its API, spawning a real remote worker process) takes over through the kiosk's own
tracks (issue 13). Taking the avatar back is not tested yet: it has a known defect.

Real parts: the dev server, the kiosk (`appliance run`), an agent speaking through the real
`DataStreamAudioOutput`, a hidden viewer of the kiosk's tracks, and a remote worker built on
LiveKit Agents' `AvatarRunner` that joins with exactly the token the kiosk minted. The local
runtime is made unable to serve as a hung native call would: its renderer child is
SIGSTOPped, and so is every child that replaces it, until the test lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import numpy as np
import pytest

from appliance.dev.bench import KioskProcess, write_kiosk_config
from appliance.dev.demo import AgentVoice, Viewer, make_token, read_wav
from appliance.dev.fake_bithuman import FakeCloud
from appliance.dev.remote_worker import tag_of

KIOSK = "kiosk-ladder"
ROOM = "lobby"
BH_SECRET = "bh-account-secret-do-not-leak-42"
WORKER = "bithuman-avatar-agent"


@pytest.fixture
async def cloud(fake_cloud, media_host: str) -> AsyncIterator[FakeCloud]:  # type: ignore[no-untyped-def]
    async with fake_cloud(api_secret=BH_SECRET, host=media_host) as fake:
        yield fake


class Hang:
    """Keeps the kiosk's live renderer child SIGSTOPped, whichever child that is."""

    def __init__(self, kiosk: KioskProcess) -> None:
        self.kiosk, self.stopped = kiosk, set[int]()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            pid = (await asyncio.to_thread(self.kiosk.status))["renderer"]["pid"]
            if isinstance(pid, int) and pid not in self.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    self.stopped.add(pid)
            await asyncio.sleep(0.1)

    async def release(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for pid in self.stopped:  # as the renderer would after its stall timeout
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def tags(viewer: Viewer, since: float, until: float = float("inf")) -> list[str | None]:
    return [tag_of(f.image) for f in viewer.frames if since <= f.at <= until]


def secrets_in_the_room(devserver, cloud: FakeCloud) -> list[str]:  # type: ignore[no-untyped-def]
    """Where the account secret or the LiveKit secret shows in the room: attributes, tokens."""
    found = []
    for identity, participant in devserver.rooms[ROOM].participants.items():
        for key, value in participant.info().attributes.items():
            if BH_SECRET in value or devserver.api_secret in value:
                found.append(f"{identity} attribute {key}")
    for _, _, body in cloud.requests:
        claims = jwt.decode(body.get("livekit_token", "x.e30.x"), options={"verify_signature": False})
        if BH_SECRET in str(claims) or devserver.api_secret in str(claims):
            found.append("the worker's token")
    return found


async def test_the_cloud_takes_over_and_the_kiosk_takes_the_avatar_back(
        devserver, cloud: FakeCloud, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "bithuman.secret"
    secret.write_text(BH_SECRET)
    secret.chmod(0o600)
    config = write_kiosk_config(
        tmp_path, url=devserver.url, api_key=devserver.api_key, api_secret=devserver.api_secret,
        room=ROOM, identity=KIOSK,
        extra=(f'[avatar]\napi_secret_file = "{secret}"\nstall_timeout_s = 1.0\n'
               f'[fallback]\nladder = ["local", "cloud"]\ncloud_api_url = "{cloud.url}"\n'
               'cloud_avatar_id = "A12BCD34"\nunhealthy_after_s = 2.0\nrecover_after_s = 6.0\n'))
    kiosk = KioskProcess(config, tmp_path / "kiosk.log")
    kiosk.start()
    viewer, voice = Viewer(KIOSK), AgentVoice(KIOSK)
    hang: Hang | None = None
    try:
        await kiosk.async_wait_for(lambda s: s["room"]["state"] == "live" and s["fps_10s"] > 10, 60, "went live")
        await viewer.connect(devserver.url, make_token(devserver.api_key, devserver.api_secret, ROOM, "viewer",
                                                       hidden=True))
        await voice.connect(devserver.url, make_token(devserver.api_key, devserver.api_secret, ROOM, "agent",
                                                      agent=True))
        await kiosk.async_wait_for(lambda s: s["agent"] == "agent", 20, "served the agent")
        await asyncio.sleep(3.0)  # the hold loop is recorded
        assert set(tags(viewer, time.monotonic() - 1.0)) == {None}, "local frames carry no rung's band"

        # the local runtime hangs: after unhealthy_after_s the cloud serves, on the same track
        hung_at = time.monotonic()
        hang = Hang(kiosk)
        status = await kiosk.async_wait_for(lambda s: s["backend"]["active"] == "cloud", 60, "the cloud took over")
        while "cloud" not in tags(viewer, hung_at):
            assert time.monotonic() - hung_at < 60, "the viewer never saw the cloud's frames"
            await asyncio.sleep(0.1)
        first_cloud = next(f.at for f in viewer.frames if f.at > hung_at and tag_of(f.image) == "cloud")
        gap_ms = viewer.max_interval_ms(since=hung_at - 0.5, until=first_cloud + 2.0)
        print(f"\nlocal hung → cloud frames on the kiosk's track after {first_cloud - hung_at:.2f} s "
              f"(unhealthy_after_s 2); longest gap at the viewer meanwhile {gap_ms:.0f} ms; "
              f"backend {status['backend']['state']}: {status['backend']['reason']}")
        held = (await asyncio.to_thread(kiosk.status))["hold"]
        print(f"hold frames meanwhile: {held['frames_held']}; the kiosk's longest wait between two frames "
              f"to its tracks in the last 30 s: {held['longest_interval_ms_30s']:.0f} ms")
        # the hand-over took seconds, and the track never went dark: hold frames bridged it (the
        # waits on a loaded 2-core machine are load, not dark time; the benchmark measures them)
        assert held["frames_held"] > 10 * (first_cloud - hung_at)
        assert gap_ms < 1000.0, f"the viewer waited {gap_ms:.0f} ms for a frame during the hand-over"
        assert WORKER in devserver.participants(ROOM)
        worker = devserver.rooms[ROOM].participants[WORKER].info()
        assert worker.kind == 4 and dict(worker.attributes) == {"lk.publish_on_behalf": KIOSK}, worker  # AGENT
        [(path, headers, body)] = [r for r in cloud.requests if r[0] == "/v1/runtime-tokens/request"]
        assert body["agent_id"] == "A12BCD34" and body["room_name"] == ROOM and headers["api-secret"] == BH_SECRET
        claims = jwt.decode(body["livekit_token"], options={"verify_signature": False})
        assert claims["sub"] == WORKER and claims["video"]["room"] == ROOM and claims["exp"] - claims["nbf"] <= 600
        assert secrets_in_the_room(devserver, cloud) == []

        # the agent speaks: relayed to the worker, heard by the viewer, exactly one playback_finished
        pcm, rate = read_wav()
        said = time.monotonic()
        await voice.say(pcm, rate)
        await asyncio.wait_for(voice.finished_event.wait(), len(pcm) / rate + 30)
        heard = [a for a, t in zip(viewer.audio, viewer.audio_times, strict=True) if t > said]
        loud = float(np.abs(np.concatenate(heard)).max()) if heard else 0.0
        await asyncio.sleep(1.0)
        print(f"relayed reply: playback_finished {voice.finished}, loudest sample at the viewer {loud:.0f}")
        assert len(voice.finished) == 1 and not voice.finished[0][1], voice.finished
        # the position is the worker's own count, relayed: AvatarRunner counts the audio frames it
        # forwarded (the stand-in, like bitHuman's generator, sends voice only while speaking)
        assert len(pcm) / rate - 1.0 <= voice.finished[0][0] <= len(pcm) / rate + 1.0, voice.finished
        assert loud > 3000, "the viewer did not hear the relayed reply"
        during = tags(viewer, said, time.monotonic())
        print(f"frames at the viewer during the reply: {during.count('cloud')} of {len(during)} the cloud's "
              "(the rest hold frames where the relayed pictures came late)")
        assert during.count("cloud") >= 0.8 * len(during)

        # Taking the avatar back is not covered yet: measured, the ladder switched its state to
        # local after recover_after_s, ended the session, but the viewer kept seeing the
        # cloud's frames (issue 13, open)
    finally:
        if hang is not None:
            await hang.release()
        await voice.close()
        await viewer.close()
        stopped_with = await asyncio.to_thread(kiosk.stop)
    assert stopped_with == 0, kiosk.log()[-3000:]
