"""The LiveKit dev server, exercised with the real `livekit` SDK (rtc.Room).

Runs inside the test's own network namespace (see conftest.py): media needs
non-loopback addresses, and nothing may leave the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import numpy as np
import pytest
from conftest import DEV_API_KEY, DEV_API_SECRET, DEV_ROOM
from livekit import rtc

from appliance.dev.server import DevServer

WIDTH = HEIGHT = 512
FPS = 25
SAMPLE_RATE = 48000
TIMEOUT = 15.0


# -- helpers ----------------------------------------------------------------------


async def wait_event(
    emitter: rtc.EventEmitter,
    event: str,
    predicate: Callable[..., bool] = lambda *a: True,
    timeout: float = TIMEOUT,
) -> tuple:
    """Wait for `event` whose arguments satisfy `predicate`; return the arguments."""
    fut: asyncio.Future[tuple] = asyncio.get_running_loop().create_future()

    def handler(*args: object) -> None:
        if not fut.done() and predicate(*args):
            fut.set_result(args)

    emitter.on(event, handler)
    try:
        return await asyncio.wait_for(fut, timeout)
    finally:
        emitter.off(event, handler)


async def until(check: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
    """Poll a condition on state the SDK updates from its own events."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def connected(url: str, token: str, **opts: object) -> AsyncIterator[rtc.Room]:
    room = rtc.Room()
    await room.connect(url, token, rtc.RoomOptions(connect_timeout=5, **opts))  # type: ignore[arg-type]
    try:
        yield room
    finally:
        await room.disconnect()


class Publisher:
    """Publishes a 512x512 video track and a 48 kHz audio track, paced at 25 fps.

    `level` is the video brightness (0..255) and `amplitude` the tone's amplitude;
    tests change them and watch the receiver follow.
    """

    def __init__(self, room: rtc.Room) -> None:
        self.room = room
        self.level = 40
        self.amplitude = 8000
        self.video_source = rtc.VideoSource(WIDTH, HEIGHT)
        self.audio_source = rtc.AudioSource(SAMPLE_RATE, 1)
        self.video_track = rtc.LocalVideoTrack.create_video_track("cam", self.video_source)
        self.audio_track = rtc.LocalAudioTrack.create_audio_track("mic", self.audio_source)
        self.sent = 0
        self._task: asyncio.Task | None = None

    async def publish(self) -> tuple[rtc.LocalTrackPublication, rtc.LocalTrackPublication]:
        video = await self.room.local_participant.publish_track(
            self.video_track,
            rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_CAMERA,
                simulcast=False,  # the dev server relays one layer
                video_encoding=rtc.VideoEncoding(max_framerate=FPS, max_bitrate=1_500_000),
            ),
        )
        audio = await self.room.local_participant.publish_track(
            self.audio_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        self._task = asyncio.create_task(self._pump())
        return video, audio

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        samples = SAMPLE_RATE // FPS
        phase = 0
        while True:
            rgba = np.full((HEIGHT, WIDTH, 4), self.level, dtype=np.uint8)
            rgba[..., 3] = 255
            self.video_source.capture_frame(
                rtc.VideoFrame(WIDTH, HEIGHT, rtc.VideoBufferType.RGBA, rgba.tobytes())
            )
            t = (np.arange(samples) + phase) / SAMPLE_RATE
            tone = (np.sin(2 * np.pi * 440 * t) * self.amplitude).astype(np.int16)
            phase += samples
            frame = rtc.AudioFrame(tone.tobytes(), SAMPLE_RATE, 1, samples)
            await self.audio_source.capture_frame(frame)
            self.sent += 1
            # Pace on a fixed schedule, so the sent rate is exactly FPS.
            delay = start + self.sent / FPS - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def subscribed_track(room: rtc.Room, identity: str, kind: int) -> rtc.RemoteTrack | None:
    participant = room.remote_participants.get(identity)
    if participant is None:
        return None
    for pub in participant.track_publications.values():
        if pub.track is not None and pub.kind == kind and pub.subscribed:
            return pub.track
    return None


def the_track(room: rtc.Room, identity: str, kind: int) -> rtc.RemoteTrack:
    track = subscribed_track(room, identity, kind)
    assert track is not None, f"no subscribed track of kind {kind} from {identity}"
    return track


def brightness(frame: rtc.VideoFrame) -> float:
    rgba = np.frombuffer(frame.convert(rtc.VideoBufferType.RGBA).data, dtype=np.uint8)
    return float(rgba.reshape(-1, 4)[:, :3].mean())


async def wait_brightness(stream: rtc.VideoStream, low: float, high: float) -> float:
    async def read() -> float:
        async for event in stream:
            value = brightness(event.frame)
            if low <= value <= high:
                return value
        raise AssertionError("video stream ended")

    return await asyncio.wait_for(read(), TIMEOUT)


# -- tests ------------------------------------------------------------------------


async def test_join_shows_kind_attributes_and_updates(devserver: DevServer, make_token) -> None:
    t0 = time.monotonic()
    async with connected(
        devserver.url, make_token("kiosk", attributes={"role": "avatar"}, metadata="m1")
    ) as kiosk:
        connect_s = time.monotonic() - t0
        print(f"\nconnect time (signal + subscriber PC): {connect_s * 1000:.0f} ms")
        joined = asyncio.create_task(wait_event(kiosk, "participant_connected"))
        async with connected(devserver.url, make_token("agent-1", kind="agent")) as agent:
            (remote,) = await joined
            assert remote.identity == "agent-1"
            assert remote.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

            seen = agent.remote_participants["kiosk"]
            assert seen.kind == rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
            assert dict(seen.attributes) == {"role": "avatar"}
            assert seen.metadata == "m1"
            assert devserver.participants(DEV_ROOM) == ["agent-1", "kiosk"]

            # Attribute changes from a participant reach the others.
            changed = asyncio.create_task(
                wait_event(
                    agent,
                    "participant_attributes_changed",
                    lambda attrs, p: p.identity == "kiosk" and "state" in attrs,
                )
            )
            await kiosk.local_participant.set_attributes({"state": "idle"})
            await changed
            assert dict(seen.attributes) == {"role": "avatar", "state": "idle"}

            left = asyncio.create_task(wait_event(kiosk, "participant_disconnected"))
        (gone,) = await left
        assert gone.identity == "agent-1"
        await until(lambda: devserver.participants(DEV_ROOM) == ["kiosk"], what="agent gone")


async def test_a_hidden_participant_is_seen_by_nobody(devserver: DevServer, make_token) -> None:
    """As livekit-server: a hidden watcher (a viewer page) is not announced, so an agent
    looking for its user cannot take it for one."""
    async with connected(devserver.url, make_token("visitor")) as visitor:
        async with connected(devserver.url, make_token("watcher", hidden=True)) as watcher:
            assert "visitor" in watcher.remote_participants
            async with connected(devserver.url, make_token("agent-1", kind="agent")) as agent:
                await asyncio.sleep(0.5)
                assert sorted(agent.remote_participants) == ["visitor"]
                assert "watcher" not in visitor.remote_participants
                assert "agent-1" in watcher.remote_participants  # a hidden watcher still sees


async def test_wrong_secret_is_refused_with_a_clear_error(signal_host: str, make_token) -> None:
    async with DevServer(signal_host, 0, DEV_API_KEY, DEV_API_SECRET) as devserver:
        await _check_wrong_secret(devserver, make_token)


async def _check_wrong_secret(devserver: DevServer, make_token) -> None:
    bad = make_token("intruder", secret="not-the-secret-0123456789abcdef0123")
    room = rtc.Room()
    with pytest.raises(rtc.ConnectError) as err:
        await room.connect(devserver.url, bad, rtc.RoomOptions(connect_timeout=5))
    print(f"\nSDK error for a wrong secret: {err.value}")
    assert "401" in str(err.value) and "signature" in str(err.value)
    assert devserver.participants(DEV_ROOM) == []

    http_url = devserver.url.replace("ws://", "http://")
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {bad}"}
        async with http.get(f"{http_url}/rtc/validate", headers=headers) as resp:
            assert resp.status == 401
            assert "another API secret" in await resp.text()
        headers = {"Authorization": f"Bearer {make_token('ok')}"}
        async with http.get(f"{http_url}/rtc/validate", headers=headers) as resp:
            assert resp.status == 200


async def test_media_flows_both_kinds_and_follows_content(devserver: DevServer, make_token) -> None:
    async with (
        connected(devserver.url, make_token("kiosk")) as kiosk,
        connected(devserver.url, make_token("viewer")) as viewer,
    ):
        publisher = Publisher(kiosk)
        gained_subscriber = asyncio.create_task(wait_event(kiosk, "local_track_subscribed"))
        video_pub, audio_pub = await publisher.publish()
        try:
            await until(
                lambda: (
                    subscribed_track(viewer, "kiosk", rtc.TrackKind.KIND_VIDEO) is not None
                    and subscribed_track(viewer, "kiosk", rtc.TrackKind.KIND_AUDIO) is not None
                ),
                what="viewer subscribed to video and audio",
            )
            (track,) = await gained_subscriber
            assert track.sid in (video_pub.sid, audio_pub.sid)

            pubs = viewer.remote_participants["kiosk"].track_publications
            assert pubs[video_pub.sid].source == rtc.TrackSource.SOURCE_CAMERA
            assert pubs[audio_pub.sid].source == rtc.TrackSource.SOURCE_MICROPHONE

            video = rtc.VideoStream(the_track(viewer, "kiosk", rtc.TrackKind.KIND_VIDEO))
            audio = rtc.AudioStream(
                the_track(viewer, "kiosk", rtc.TrackKind.KIND_AUDIO),
                sample_rate=SAMPLE_RATE,
                num_channels=1,
            )
            # Brightness follows what is sent: dark, then bright.
            assert await wait_brightness(video, 0, 60) < 60
            publisher.level = 210
            assert await wait_brightness(video, 190, 255) > 190

            async def audio_energy() -> float:
                async for event in audio:
                    pcm = np.frombuffer(event.frame.data, dtype=np.int16)
                    energy = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
                    if energy > 500:
                        return energy
                raise AssertionError("audio stream ended")

            energy = await asyncio.wait_for(audio_energy(), TIMEOUT)
            print(f"\naudio RMS at the subscriber: {energy:.0f} (sent tone amplitude 8000)")

            # Frame rate at the subscriber, published with max_framerate=25.
            frames, start = 0, time.monotonic()
            async for _event in video:
                frames += 1
                if time.monotonic() - start >= 3.0:
                    break
            fps = frames / (time.monotonic() - start)
            print(f"video at the subscriber: {fps:.1f} fps (sent {FPS})")
            assert fps >= 15, f"video arrives at {fps:.1f} fps"
            await video.aclose()
            await audio.aclose()

            # A participant joining later gets the tracks already published.
            async with connected(devserver.url, make_token("late")) as late:
                await until(
                    lambda: subscribed_track(late, "kiosk", rtc.TrackKind.KIND_VIDEO) is not None,
                    what="late joiner subscribed",
                )
                late_video = rtc.VideoStream(the_track(late, "kiosk", rtc.TrackKind.KIND_VIDEO))
                assert await wait_brightness(late_video, 190, 255) > 190
                await late_video.aclose()

            # Unpublishing reaches the subscriber.
            unpublished = asyncio.create_task(wait_event(viewer, "track_unpublished"))
            await kiosk.local_participant.unpublish_track(video_pub.sid)
            (pub, participant) = await unpublished
            assert pub.sid == video_pub.sid and participant.identity == "kiosk"
        finally:
            await publisher.stop()


async def test_byte_streams_and_rpc_in_both_directions(
    devserver: DevServer, make_token, tmp_path
) -> None:
    async with (
        connected(devserver.url, make_token("kiosk")) as kiosk,
        connected(devserver.url, make_token("agent", kind="agent")) as agent,
        connected(devserver.url, make_token("bystander")) as bystander,
    ):
        received: dict[str, asyncio.Future] = {
            name: asyncio.get_running_loop().create_future() for name in ("kiosk", "agent")
        }
        stray: list[str] = []

        def handler_for(name: str):
            def on_stream(reader: rtc.ByteStreamReader, sender: str) -> None:
                async def read() -> None:
                    data = b"".join([chunk async for chunk in reader])
                    received[name].set_result((sender, reader.info, data))

                asyncio.create_task(read())

            return on_stream

        kiosk.register_byte_stream_handler("lk.audio_stream", handler_for("kiosk"))
        agent.register_byte_stream_handler("files", handler_for("agent"))
        bystander.register_byte_stream_handler(
            "lk.audio_stream", lambda reader, sender: stray.append(sender)
        )

        # agent -> kiosk: a byte stream with a topic and attributes, addressed to one
        # participant, larger than one data packet (chunks of 15 kB).
        pcm = (np.arange(48000, dtype=np.int16) % 4000).tobytes()
        writer = await agent.local_participant.stream_bytes(
            "audio",
            topic="lk.audio_stream",
            attributes={"sample_rate": "24000", "num_channels": "1"},
            destination_identities=["kiosk"],
        )
        await writer.write(pcm)
        await writer.aclose()
        sender, info, data = await asyncio.wait_for(received["kiosk"], TIMEOUT)
        assert sender == "agent"
        assert info.attributes == {"sample_rate": "24000", "num_channels": "1"}
        assert data == pcm

        # kiosk -> agent: send_file.
        path = tmp_path / "hello.bin"
        path.write_bytes(bytes(range(256)) * 300)
        await kiosk.local_participant.send_file(str(path), topic="files")
        sender, info, data = await asyncio.wait_for(received["agent"], TIMEOUT)
        assert sender == "kiosk" and info.name == "hello.bin"
        assert data == path.read_bytes()

        # RPC both ways, as LiveKit Agents' avatar protocol uses it.
        async def clear_buffer(data: rtc.RpcInvocationData) -> str:
            return f"cleared for {data.caller_identity}: {data.payload}"

        async def playback_finished(data: rtc.RpcInvocationData) -> str:
            return f"ack {data.payload} from {data.caller_identity}"

        kiosk.local_participant.register_rpc_method("lk.clear_buffer", clear_buffer)
        agent.local_participant.register_rpc_method("lk.playback_finished", playback_finished)

        reply = await agent.local_participant.perform_rpc(
            destination_identity="kiosk", method="lk.clear_buffer", payload="now"
        )
        assert reply == "cleared for agent: now"
        reply = await kiosk.local_participant.perform_rpc(
            destination_identity="agent", method="lk.playback_finished", payload="42"
        )
        assert reply == "ack 42 from kiosk"

        with pytest.raises(rtc.RpcError):
            await agent.local_participant.perform_rpc(
                destination_identity="kiosk", method="no.such.method", payload=""
            )
        # The bystander got nothing addressed to the kiosk.
        assert stray == []


async def test_clients_come_back_after_server_restart(devserver: DevServer, make_token) -> None:
    kiosk, viewer = rtc.Room(), rtc.Room()
    opts = rtc.RoomOptions(connect_timeout=5)
    await kiosk.connect(devserver.url, make_token("kiosk"), opts)
    await viewer.connect(devserver.url, make_token("viewer"), opts)
    publisher = Publisher(kiosk)
    try:
        await publisher.publish()
        await until(
            lambda: subscribed_track(viewer, "kiosk", rtc.TrackKind.KIND_VIDEO) is not None,
            what="subscribed before the outage",
        )

        # An outage: both clients notice before the server comes back on the same port.
        noticed = [
            asyncio.create_task(wait_event(room, "reconnecting")) for room in (kiosk, viewer)
        ]
        await devserver.stop()
        assert devserver.participants(DEV_ROOM) == []
        await asyncio.gather(*noticed)
        await devserver.start()
        t0 = time.monotonic()

        await until(
            lambda: devserver.participants(DEV_ROOM) == ["kiosk", "viewer"],
            timeout=40,
            what="both clients back in the room",
        )
        await until(
            lambda: (
                subscribed_track(viewer, "kiosk", rtc.TrackKind.KIND_VIDEO) is not None
                and viewer.remote_participants["kiosk"].sid
                == devserver.rooms[DEV_ROOM].participants["kiosk"].sid
            ),
            timeout=20,
            what="video subscribed again after the restart",
        )
        print(f"\nback after restart in {time.monotonic() - t0:.1f} s")
        video = rtc.VideoStream(the_track(viewer, "kiosk", rtc.TrackKind.KIND_VIDEO))
        publisher.level = 220
        assert await wait_brightness(video, 200, 255) > 200
        await video.aclose()
        assert kiosk.connection_state == rtc.ConnectionState.CONN_CONNECTED
    finally:
        await publisher.stop()
        await kiosk.disconnect()
        await viewer.disconnect()


async def test_livekit_agents_avatar_audio_protocol(devserver: DevServer, make_token) -> None:
    """LiveKit Agents' avatar protocol, unchanged, over the dev server: the agent's
    DataStreamAudioOutput streams TTS audio to the kiosk's DataStreamAudioReceiver
    (byte stream "lk.audio_stream"), which answers with lk.playback_finished; the
    agent's clear_buffer() reaches the kiosk as lk.clear_buffer."""
    from livekit.agents.voice.avatar import (
        AudioSegmentEnd,
        DataStreamAudioOutput,
        DataStreamAudioReceiver,
    )

    async with (
        connected(devserver.url, make_token("kiosk")) as kiosk,
        connected(devserver.url, make_token("agent", kind="agent")) as agent,
    ):
        acked: list[str] = []
        perform_rpc = kiosk.local_participant.perform_rpc

        async def recording_rpc(**kwargs):  # see the kiosk's RPC calls complete
            reply = await perform_rpc(**kwargs)
            acked.append(kwargs["method"])
            return reply

        kiosk.local_participant.perform_rpc = recording_rpc  # type: ignore[method-assign]

        receiver = DataStreamAudioReceiver(kiosk)  # waits for a participant of kind agent
        await asyncio.wait_for(receiver.start(), TIMEOUT)
        output = DataStreamAudioOutput(agent, destination_identity="kiosk", sample_rate=24000)

        tts_rate, chunk = 24000, 2400  # 100 ms frames, 0.5 s of speech
        for i in range(5):
            t = (np.arange(chunk) + i * chunk) / tts_rate
            pcm = (np.sin(2 * np.pi * 220 * t) * 6000).astype(np.int16)
            await output.capture_frame(rtc.AudioFrame(pcm.tobytes(), tts_rate, 1, chunk))
        output.flush()

        async def receive_segment() -> float:
            seconds = 0.0
            async for item in receiver:
                if isinstance(item, AudioSegmentEnd):
                    return seconds
                assert np.abs(np.frombuffer(item.data, dtype=np.int16)).max() > 1000
                seconds += item.samples_per_channel / item.sample_rate
            raise AssertionError("receiver ended")

        seconds = await asyncio.wait_for(receive_segment(), TIMEOUT)
        assert seconds == pytest.approx(0.5, abs=0.01)

        receiver.notify_playback_finished(playback_position=seconds, interrupted=False)
        finished = await asyncio.wait_for(output.wait_for_playout(), TIMEOUT)
        assert finished.playback_position == pytest.approx(0.5, abs=0.01)
        assert not finished.interrupted

        cleared = asyncio.get_running_loop().create_future()

        def on_clear_buffer() -> None:
            if not cleared.done():
                cleared.set_result(True)

        receiver.on("clear_buffer", on_clear_buffer)
        await output.capture_frame(rtc.AudioFrame(bytes(chunk * 2), tts_rate, 1, chunk))
        output.clear_buffer()
        await asyncio.wait_for(cleared, TIMEOUT)
        receiver.notify_playback_finished(playback_position=0.0, interrupted=True)
        finished = await asyncio.wait_for(output.wait_for_playout(), TIMEOUT)
        assert finished.interrupted
        # Both lk.playback_finished calls were acknowledged by the agent (its replies
        # travel back as RPC v2 data streams), so nothing is in flight at teardown.
        await until(lambda: acked.count("lk.playback_finished") == 2, what="playback acks")
        await receiver.aclose()


async def test_start_stop_frees_the_port(signal_host: str) -> None:
    server = DevServer(signal_host, 0, DEV_API_KEY, DEV_API_SECRET)
    await server.start()
    port = server.port
    assert server.url == f"ws://{signal_host}:{port}"
    await server.stop()
    again = DevServer(signal_host, port, DEV_API_KEY, DEV_API_SECRET)
    await again.start()
    await again.stop()


async def test_auto_subscribe_false_gets_only_what_it_asks_for(devserver: DevServer, make_token) -> None:
    """The kiosk's visitor participant subscribes to nothing: the server must not push it the
    avatar's tracks (a real server does not), and a track asked for does arrive."""
    async with (
        connected(devserver.url, make_token("kiosk")) as kiosk,
        connected(devserver.url, make_token("visitor"), auto_subscribe=False) as visitor,
        connected(devserver.url, make_token("viewer")) as viewer,
    ):
        publisher = Publisher(kiosk)
        video_pub, audio_pub = await publisher.publish()
        try:
            await until(lambda: subscribed_track(viewer, "kiosk", rtc.TrackKind.KIND_AUDIO) is not None,
                        what="the auto-subscribing viewer got the audio")
            await until(lambda: audio_pub.sid in visitor.remote_participants["kiosk"].track_publications,
                        what="the visitor knows the publication")
            await asyncio.sleep(1.0)
            assert subscribed_track(visitor, "kiosk", rtc.TrackKind.KIND_AUDIO) is None
            assert subscribed_track(visitor, "kiosk", rtc.TrackKind.KIND_VIDEO) is None
            visitor.remote_participants["kiosk"].track_publications[audio_pub.sid].set_subscribed(True)
            await until(lambda: subscribed_track(visitor, "kiosk", rtc.TrackKind.KIND_AUDIO) is not None,
                        what="the visitor got the audio it asked for")
            assert subscribed_track(visitor, "kiosk", rtc.TrackKind.KIND_VIDEO) is None
        finally:
            await publisher.stop()
