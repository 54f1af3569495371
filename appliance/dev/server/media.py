"""Peer connections and media relay of the dev server (aiortc).

Classic LiveKit two-PeerConnection model, per participant:

* `PublisherPeer`: the client offers, we answer.  Carries the client's published
  tracks and its `_reliable` / `_lossy` data channels (client -> server).
* `SubscriberPeer`: we offer, the client answers.  Carries every other
  participant's tracks and our `_reliable` / `_lossy` data channels
  (server -> client).  It is renegotiated whenever tracks come and go.

Video is relayed by decoding and re-encoding per subscriber (aiortc cannot forward
RTP as-is); the voice goes through as Opus packets (`OpusPassthrough`).  Each
published track gets one `TrackFanout` that always drains it and hands every frame
to one `FanoutTrack` per subscriber.

Publishers are told a fixed receive bitrate (`INGRESS_BITRATE_BPS`, REMB once a
second) instead of aiortc's estimate.  aiortc's receive-side estimator times each
packet when the event loop gets to it, so a stall of this process (another
participant joining: its PCs, DTLS, a first keyframe to encode) reads as a
congested network: the estimate fell from ~350 to ~175 kbps within 0.3 s of an
agent joining, the publisher (libwebrtc) halved its picture to 256x256, and the
estimate then climbed back by ~8 %/s, so it took ~20 s to return to 512x512.
The links it serves are local (a dev machine, a test namespace): the publisher's
own encoding limits are the right cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc import sdp as aiortc_sdp
from aiortc.clock import datetime_to_ntp
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)

RELIABLE = "_reliable"
LOSSY = "_lossy"

INGRESS_BITRATE_BPS = 5_000_000
REMB_INTERVAL_S = 1.0  # libwebrtc sends REMB about once a second too

# How long we wait for the client's answer to a subscriber offer before re-offering.
CONNECT_TIMEOUT_S = 15.0
ANSWER_TIMEOUT = 10.0


def new_peer_connection() -> RTCPeerConnection:
    # iceServers=[]: aiortc would otherwise add a public Google STUN server, and the dev
    # server must never send anything beyond the hosts it serves.  MAX_BUNDLE: one
    # transport per PC, like libwebrtc and livekit-server.
    return RTCPeerConnection(
        RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
    )


def parse_candidate(candidate_init: str) -> RTCIceCandidate | None:
    """A trickled candidate (JSON `{candidate, sdpMid, sdpMLineIndex}`), or None to skip."""
    data = json.loads(candidate_init)
    line = data.get("candidate") or ""
    if line.startswith("candidate:"):
        line = line[len("candidate:") :]
    if not line:
        return None  # end-of-candidates: the SDK gathers continually, nothing to do
    candidate = aiortc_sdp.candidate_from_sdp(line)
    if candidate.protocol.lower() != "udp":
        return None  # aioice speaks UDP only
    candidate.sdpMid = data.get("sdpMid")
    candidate.sdpMLineIndex = data.get("sdpMLineIndex")
    return candidate


def sending_mids(offer_sdp: str) -> set[str]:
    """The mids of the media sections in which the offerer sends media."""
    description = aiortc_sdp.SessionDescription.parse(offer_sdp)
    return {
        m.rtp.muxId
        for m in description.media
        if m.kind in ("audio", "video") and m.port != 0 and m.direction in ("sendonly", "sendrecv")
    }


class FixedBitrateEstimate:
    """Stands in for aiortc's RemoteBitrateEstimator: the same REMB, once a second."""

    def __init__(self, bitrate_bps: int = INGRESS_BITRATE_BPS) -> None:
        self.bitrate_bps = bitrate_bps
        self._next = 0.0

    def add(
        self, abs_send_time: int, arrival_time_ms: int, payload_size: int, ssrc: int
    ) -> tuple[int, list[int]] | None:
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + REMB_INTERVAL_S
        return self.bitrate_bps, [ssrc]


class OpusPassthrough:
    """Stands in for an aiortc audio receiver's decoder queue: Opus frames reach the
    track as they are (`av.Packet`), and each subscriber's sender sends them unchanged.

    Decoding and re-encoding the voice cost the event loop a thread hop each way and
    a pure-Python audio-level pass per frame and subscriber (15 % of the loop with
    two subscribers); under load that came out as bursts, which grow the browser's
    jitter buffer and with it the voice's lag behind the picture.  aiortc's decoder
    thread keeps waiting on `get()` until the receiver stops (`put(None)`)."""

    def __init__(self, receiver: object) -> None:
        self._receiver = receiver
        self._stop: queue.Queue[None] = queue.Queue()

    def put(self, item: tuple[object, object] | None) -> None:
        if item is None:
            self._stop.put(None)
            return
        codec, frame = item  # called on the event loop, from RTCRtpReceiver
        packet = av.Packet(frame.data)  # type: ignore[attr-defined]
        packet.pts = frame.timestamp  # type: ignore[attr-defined]
        packet.time_base = Fraction(1, codec.clockRate)  # type: ignore[attr-defined]
        track = self._receiver.track  # type: ignore[attr-defined]
        if track is not None:
            track._queue.put_nowait(packet)

    def get(self) -> None:
        return self._stop.get()


def tune_receiver(receiver: Any) -> None:
    """Fixed REMB for video (see above); audio passed through undecoded, without prefetch.

    aiortc's audio jitter buffer holds 4 packets (80 ms) before it lets one go, and
    that delay is the voice's alone: the picture goes on as soon as a frame is
    complete.  On the local links we serve, packets do not reorder."""
    # aiortc has no public knobs for these: its receiver's private attributes
    if receiver._RTCRtpReceiver__remote_bitrate_estimator is not None:
        receiver._RTCRtpReceiver__remote_bitrate_estimator = FixedBitrateEstimate()
    if receiver._RTCRtpReceiver__kind == "audio":
        receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=16, prefetch=1)
        receiver._RTCRtpReceiver__decoder_queue = OpusPassthrough(receiver)


class FanoutTrack(MediaStreamTrack):
    """One subscriber's view of a published track."""

    def __init__(self, fanout: TrackFanout, kind: str, maxsize: int) -> None:
        super().__init__()
        self.kind = kind
        self._fanout: TrackFanout | None = fanout
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        self.arrived_at = 0.0  # wall clock: when the frame last handed out reached the server

    def push(self, frame: object) -> None:
        # A slow encoder must not build latency: drop the oldest frame instead.
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
        self._queue.put_nowait((time.time(), frame))

    async def recv(self):  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        arrived_at, frame = await self._queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        self.arrived_at = arrived_at
        return frame

    def stop(self) -> None:
        super().stop()
        if self._fanout is not None:
            self._fanout.discard(self)
            self._fanout = None


class ArrivalClockSender(RTCRtpSender):
    """A sender whose RTCP sender reports map RTP time to when the frame *reached the
    server*, not to when aiortc sent it.

    A browser lines up a participant's audio and video (same msid stream) by the NTP
    times in their sender reports. aiortc stamps them with its send time: the voice,
    passed through, leaves at once, the picture only after a decode and re-encode, so
    every picture looked that much younger than its voice, and a browser that synced
    by them showed the mouth ahead of the voice. livekit-server keeps the publisher's
    own clock; the arrival time is the closest a re-encoding relay gets to it.
    Installed with ``sender.__class__ = ArrivalClockSender`` (aiortc makes the sender)."""

    @property
    def _RTCRtpSender__ntp_timestamp(self) -> int:  # read by aiortc's RTCP loop for the SR
        arrived = getattr(self, "_sr_arrived_at", 0.0)
        if arrived:
            return datetime_to_ntp(datetime.datetime.fromtimestamp(arrived, datetime.UTC))
        return int(getattr(self, "_sr_sent_ntp", 0))

    @_RTCRtpSender__ntp_timestamp.setter
    def _RTCRtpSender__ntp_timestamp(self, value: int) -> None:  # aiortc: after each packet
        self._sr_sent_ntp = value
        track = self.track
        self._sr_arrived_at = getattr(track, "arrived_at", 0.0) if track is not None else 0.0



class TrackFanout:
    """Drains one published track and copies each frame to every subscriber.

    Draining even with no subscriber matters: aiortc's remote track queues decoded
    frames without bound until someone reads them.
    """

    def __init__(self, source: MediaStreamTrack) -> None:
        self.source = source
        self.kind = source.kind
        self.frames = 0
        self._sinks: set[FanoutTrack] = set()
        self._task = asyncio.create_task(self._run(), name=f"fanout-{source.kind}")

    def subscribe(self) -> FanoutTrack:
        # Video keeps only the newest frames; audio buffers up to ~1 s of 20 ms frames.
        sink = FanoutTrack(self, self.kind, maxsize=2 if self.kind == "video" else 50)
        self._sinks.add(sink)
        return sink

    def discard(self, sink: FanoutTrack) -> None:
        self._sinks.discard(sink)

    async def _run(self) -> None:
        try:
            while True:
                try:
                    frame = await self.source.recv()
                except MediaStreamError:
                    break
                self.frames += 1
                for sink in list(self._sinks):
                    sink.push(frame)
        finally:
            for sink in list(self._sinks):
                sink.push(None)

    def stop(self) -> None:
        self._task.cancel()
        for sink in list(self._sinks):
            sink.push(None)


class _Peer:
    """What both PCs share: trickle ICE that may arrive before the remote description."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.pc = new_peer_connection()
        self._early_candidates: list[RTCIceCandidate] = []
        self._closed = False

    async def add_candidate(self, candidate: RTCIceCandidate) -> None:
        if self._closed:
            return
        if self.pc.remoteDescription is None:
            self._early_candidates.append(candidate)
            return
        try:
            await self.pc.addIceCandidate(candidate)
        except Exception as exc:  # a bad candidate must not end the session
            log.debug("%s: ignoring candidate %s: %s", self.label, candidate, exc)

    async def _flush_candidates(self) -> None:
        early, self._early_candidates = self._early_candidates, []
        for candidate in early:
            await self.add_candidate(candidate)

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            await self.pc.close()


class PublisherPeer(_Peer):
    """The PC on which the client publishes; we answer its offers."""

    def __init__(
        self,
        label: str,
        on_data: Callable[[str, bytes], None],
    ) -> None:
        super().__init__(label)
        self._on_data = on_data
        self._new_tracks: list[tuple[MediaStreamTrack, RTCRtpTransceiver]] = []

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            transceiver = next(t for t in self.pc.getTransceivers() if t.receiver.track is track)
            tune_receiver(transceiver.receiver)
            self._new_tracks.append((track, transceiver))

        @self.pc.on("datachannel")
        def _on_datachannel(channel: RTCDataChannel) -> None:
            label = channel.label
            if label not in (RELIABLE, LOSSY):
                # e.g. the SDK's "_data_track" channel (data tracks): not supported here.
                log.debug("%s: ignoring data channel %r", self.label, label)
                return

            @channel.on("message")
            def _on_message(message: bytes | str) -> None:
                if isinstance(message, bytes):
                    self._on_data(label, message)

    async def answer(
        self, offer_sdp: str
    ) -> tuple[str, list[tuple[MediaStreamTrack, RTCRtpTransceiver]], set[str]]:
        """Apply an offer; return (answer sdp, tracks new in it, mids that still send)."""
        self._new_tracks = []
        await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        await self._flush_candidates()
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        new_tracks, self._new_tracks = self._new_tracks, []
        return self.pc.localDescription.sdp, new_tracks, sending_mids(offer_sdp)


@dataclass
class _Subscription:
    track_sid: str
    transceiver: RTCRtpTransceiver
    sink: FanoutTrack
    confirmed: bool = False  # the client has answered an offer containing it


class SubscriberPeer(_Peer):
    """The PC on which the client receives; we offer, renegotiating on every change."""

    def __init__(
        self,
        label: str,
        send_offer: Callable[[str, int], None],
        on_subscribed: Callable[[str], None],
    ) -> None:
        super().__init__(label)
        self._send_offer = send_offer
        self._on_subscribed = on_subscribed
        self._subs: dict[str, _Subscription] = {}
        self._offer_id = 0
        self._answered: asyncio.Future | None = None
        self._dirty = asyncio.Event()
        # Server -> client data channels must exist before the first offer.
        self._channels = {
            RELIABLE: self.pc.createDataChannel(RELIABLE, ordered=True),
            LOSSY: self.pc.createDataChannel(LOSSY, ordered=False, maxRetransmits=0),
        }
        self._outbox: dict[str, list[bytes]] = {RELIABLE: [], LOSSY: []}
        for name, channel in self._channels.items():
            channel.on("open", lambda name=name: self._flush_outbox(name))
        self._task: asyncio.Task | None = None
        # aiortc mis-handles BUNDLE when the first offer puts media sections before
        # the data section it created first (it closes the shared transport).  So the
        # first offer carries the data channels only; tracks follow in the next one.
        self._first_answered = False
        self._deferred: dict[str, tuple[str, TrackFanout]] = {}

    def start(self) -> None:
        self._dirty.set()
        self._task = asyncio.create_task(self._negotiation_loop(), name=f"{self.label}-negotiate")

    # -- tracks -----------------------------------------------------------------

    def add_track(self, stream_id: str, track_sid: str, fanout: TrackFanout) -> None:
        if track_sid in self._subs or self._closed:
            return
        if not self._first_answered:
            self._deferred[track_sid] = (stream_id, fanout)
            return
        sink = fanout.subscribe()
        transceiver = self.pc.addTransceiver(sink, direction="sendonly")
        transceiver.sender.__class__ = ArrivalClockSender
        # The SDK finds participant and publication from the msid: stream id
        # "PA_xxx|camera" (or "PA_xxx|TR_xxx", see room.stream_id), track id = track sid.
        transceiver.sender._stream_id = stream_id
        transceiver.sender._track_id = track_sid
        self._subs[track_sid] = _Subscription(track_sid, transceiver, sink)
        self._dirty.set()

    async def remove_track(self, track_sid: str) -> None:
        self._deferred.pop(track_sid, None)
        sub = self._subs.pop(track_sid, None)
        if sub is None:
            return
        sub.sink.stop()
        sub.transceiver.direction = "inactive"
        with contextlib.suppress(Exception):
            await sub.transceiver.sender.stop()
        self._dirty.set()

    # -- negotiation ------------------------------------------------------------

    async def _negotiation_loop(self) -> None:
        try:
            await self._negotiate_forever()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: subscriber negotiation failed", self.label)

    async def _negotiate_forever(self) -> None:
        while not self._closed:
            await self._dirty.wait()
            self._dirty.clear()
            if self._closed:
                return
            offered = [s for s in self._subs.values() if not s.confirmed]
            await self.pc.setLocalDescription(await self.pc.createOffer())
            self._offer_id += 1
            self._answered = asyncio.get_running_loop().create_future()
            self._send_offer(self.pc.localDescription.sdp, self._offer_id)
            try:
                await asyncio.wait_for(asyncio.shield(self._answered), ANSWER_TIMEOUT)
            except TimeoutError:
                log.warning("%s: no answer to subscriber offer, offering again", self.label)
                self._dirty.set()
                continue
            for sub in offered:
                if self._subs.get(sub.track_sid) is sub and not sub.confirmed:
                    sub.confirmed = True
                    self._on_subscribed(sub.track_sid)
            if not self._first_answered:
                # aiortc starts a sender only if the transport is already connected when the
                # answer is applied; tracks offered while the first DTLS handshake is still
                # running would never send. So the tracks wait for the connection.
                await self._wait_connected(CONNECT_TIMEOUT_S)
                self._first_answered = True
                deferred, self._deferred = self._deferred, {}
                for track_sid, (stream_id, fanout) in deferred.items():
                    self.add_track(stream_id, track_sid, fanout)

    async def _wait_connected(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.pc.connectionState != "connected" and time.monotonic() < deadline:
            if self._closed or self.pc.connectionState in ("failed", "closed"):
                return
            await asyncio.sleep(0.02)

    async def handle_answer(self, answer_sdp: str) -> None:
        if self.pc.signalingState != "have-local-offer":
            log.debug("%s: ignoring unexpected answer", self.label)
            return
        await self.pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
        await self._flush_candidates()
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(None)

    # -- data -------------------------------------------------------------------

    def send_data(self, channel_label: str, payload: bytes) -> None:
        channel = self._channels.get(channel_label, self._channels[RELIABLE])
        if channel.readyState == "open":
            channel.send(payload)
        elif channel.readyState == "connecting":
            self._outbox[channel.label].append(payload)

    def _flush_outbox(self, label: str) -> None:
        pending, self._outbox[label] = self._outbox[label], []
        for payload in pending:
            self._channels[label].send(payload)

    async def close(self) -> None:
        self._closed = True
        self._dirty.set()
        if self._task is not None:
            self._task.cancel()
        for sub in self._subs.values():
            sub.sink.stop()
        self._subs.clear()
        await super().close()
