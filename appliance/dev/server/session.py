"""One signalling session: a participant's WebSocket, its two PCs and its room.

Messages are `livekit.protocol` `SignalRequest` / `SignalResponse` protobufs in
binary WebSocket frames.  Requests are handled one at a time, in order, so a
publisher offer is applied before the candidates trickled after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web
from livekit.protocol import models, rtc

from appliance.dev.server.media import (
    LOSSY,
    RELIABLE,
    PublisherPeer,
    SubscriberPeer,
    TrackFanout,
    parse_candidate,
)
from appliance.dev.server.room import (
    Participant,
    PublishedTrack,
    Room,
    stream_id,
    track_info_from_request,
)

if TYPE_CHECKING:
    from appliance.dev.server.server import DevServer

log = logging.getLogger(__name__)

PING_INTERVAL = 5  # seconds, livekit-server's defaults
PING_TIMEOUT = 15
# Must be plain semver >= 1.8.0: the SDK refuses RPC below 1.8.0 (and a pre-release
# suffix sorts below it), and it unwraps Version::parse, so a non-semver string panics.
SERVER_VERSION = "1.9.0"
PROTOCOL_VERSION = 16

_MIME = {"audio": "audio/opus", "video": "video/VP8"}


class ParticipantSession:
    def __init__(
        self, server: DevServer, ws: web.WebSocketResponse, room: Room, participant: Participant
    ) -> None:
        self.server = server
        self.ws = ws
        self.room = room
        self.participant = participant
        participant.session = self
        label = f"{room.name}/{participant.identity}"
        self.label = label
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closed = False
        self.publisher = PublisherPeer(f"{label}/pub", on_data=self._on_data)
        self.subscriber = SubscriberPeer(
            f"{label}/sub", send_offer=self._send_offer, on_subscribed=self._on_subscribed
        )

        @self.subscriber.pc.on("connectionstatechange")
        def _on_state() -> None:
            state = self.subscriber.pc.connectionState
            if state == "connected" and participant.state != models.ParticipantInfo.State.ACTIVE:
                participant.state = models.ParticipantInfo.State.ACTIVE
                self.broadcast_update(participant)

    # -- outgoing ---------------------------------------------------------------

    def send(self, response: rtc.SignalResponse) -> None:
        if not self._closed:
            self._out.put_nowait(response.SerializeToString())

    async def _writer(self) -> None:
        while (payload := await self._out.get()) is not None:
            try:
                await self.ws.send_bytes(payload)
            except (ConnectionError, RuntimeError):
                return

    def broadcast_update(self, *participants: Participant) -> None:
        """Tell everyone in the room (the participants themselves included); a hidden
        participant is news to itself only, as in livekit-server."""
        for p in self.room.participants.values():
            infos = [q.info() for q in participants if q is p or not q.grant.hidden]
            if p.session is not None and infos:
                p.session.send(rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=infos)))

    def _send_offer(self, sdp: str, offer_id: int) -> None:
        self.send(
            rtc.SignalResponse(offer=rtc.SessionDescription(type="offer", sdp=sdp, id=offer_id))
        )

    def _on_subscribed(self, track_sid: str) -> None:
        # Tell the publisher that its track gained a subscriber (local_track_subscribed).
        for p in self.room.others(self.participant):
            if track_sid in p.tracks and p.session is not None:
                p.session.send(
                    rtc.SignalResponse(track_subscribed=rtc.TrackSubscribed(track_sid=track_sid))
                )

    # -- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        """Join, serve the socket until it closes, then leave."""
        writer = asyncio.create_task(self._writer(), name=f"{self.label}-writer")
        try:
            self._join()
            while True:
                try:
                    msg = await self.ws.receive()
                except TimeoutError:
                    log.warning(
                        "%s: no ping for %d s, dropping the client", self.label, PING_TIMEOUT
                    )
                    break
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type == WSMsgType.BINARY:
                    req = rtc.SignalRequest()
                    try:
                        req.ParseFromString(msg.data)
                    except Exception:
                        log.warning("%s: undecodable signal message", self.label)
                        continue
                    try:
                        if await self._handle(req) is False:
                            break
                    except Exception:
                        log.exception(
                            "%s: failed to handle %s", self.label, req.WhichOneof("message")
                        )
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            await self.close()
            self._out.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 1)
            writer.cancel()
            with contextlib.suppress(Exception):
                await self.ws.close()

    def _join(self) -> None:
        p, room = self.participant, self.room
        others = room.others(p)
        self.send(
            rtc.SignalResponse(
                join=rtc.JoinResponse(
                    room=room.info(),
                    participant=p.info(),
                    other_participants=[o.info() for o in others if not o.grant.hidden],
                    server_version=SERVER_VERSION,
                    server_info=models.ServerInfo(
                        edition=models.ServerInfo.Edition.Standard,
                        version=SERVER_VERSION,
                        protocol=PROTOCOL_VERSION,
                        node_id="appliance-devserver",
                    ),
                    ice_servers=[],  # host candidates only: never reach outside
                    subscriber_primary=True,
                    ping_interval=PING_INTERVAL,
                    ping_timeout=PING_TIMEOUT,
                )
            )
        )
        # Subscribe to what the others already publish.  The first subscriber offer
        # carries only the data channels (`connect` returns once that PC is up); these
        # tracks follow in the next offer, see SubscriberPeer.
        for other in others if p.subscribes_to_all else []:
            for track in other.tracks.values():
                if track.fanout is not None:
                    self.subscriber.add_track(
                        stream_id(other, track.info, p), track.info.sid, track.fanout
                    )
        self.subscriber.start()
        for other in others:
            if other.session is not None and not p.grant.hidden:
                other.session.send(
                    rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=[p.info()]))
                )

    async def close(self, leave: rtc.LeaveRequest | None = None) -> None:
        """Leave the room: tell the others, drop our tracks from their PCs, close ours."""
        if self._closed:
            return
        if leave is not None:
            self.send(rtc.SignalResponse(leave=leave))
            self._out.put_nowait(None)
        self._closed = True
        p, room = self.participant, self.room
        if room.participants.get(p.identity) is p:
            del room.participants[p.identity]
            gone = rtc.SignalResponse(
                update=rtc.ParticipantUpdate(
                    participants=[p.info(state=models.ParticipantInfo.State.DISCONNECTED)]
                )
            )
            for other in list(room.participants.values()):
                if other.session is not None:
                    if not p.grant.hidden:
                        other.session.send(gone)
                    for track_sid in p.tracks:
                        await other.session.subscriber.remove_track(track_sid)
            self.server._room_emptied(room)
        for track in p.tracks.values():
            if track.fanout is not None:
                track.fanout.stop()
        p.session = None
        await self.subscriber.close()
        await self.publisher.close()
        log.info("%s left", self.label)

    # -- requests ---------------------------------------------------------------

    async def _handle(self, req: rtc.SignalRequest) -> bool | None:
        kind = req.WhichOneof("message")
        if kind == "offer":
            await self._on_publisher_offer(req.offer)
        elif kind == "answer":
            await self.subscriber.handle_answer(req.answer.sdp)
        elif kind == "trickle":
            candidate = parse_candidate(req.trickle.candidateInit)
            if candidate is not None:
                peer = self.publisher if req.trickle.target == rtc.PUBLISHER else self.subscriber
                await peer.add_candidate(candidate)
        elif kind == "add_track":
            self._on_add_track(req.add_track)
        elif kind == "mute":
            self._on_mute(req.mute)
        elif kind == "update_metadata":
            self._on_update_metadata(req.update_metadata)
        elif kind == "ping":
            self.send(rtc.SignalResponse(pong=int(time.time() * 1000)))
        elif kind == "ping_req":
            self.send(
                rtc.SignalResponse(
                    pong_resp=rtc.Pong(
                        last_ping_timestamp=req.ping_req.timestamp,
                        timestamp=int(time.time() * 1000),
                    )
                )
            )
        elif kind == "subscription":
            await self.update_subscription(list(req.subscription.track_sids), req.subscription.subscribe)
        elif kind == "leave":
            log.info("%s: client leaves", self.label)
            return False
        else:
            # track_setting, sync_state, update_layers...: one quality for everyone,
            # nothing to do.
            log.debug("%s: ignoring %s", self.label, kind)
        return None

    async def update_subscription(self, track_sids: list[str], subscribe: bool) -> None:
        """Selective subscription (clients that joined with auto_subscribe=False, and
        RoomService.UpdateSubscriptions)."""
        p = self.participant
        if not p.grant.can_subscribe:
            return
        for sid in track_sids:
            owner = next((o for o in self.room.others(p) if sid in o.tracks), None)
            track = owner.tracks[sid] if owner is not None else None
            if not subscribe:
                await self.subscriber.remove_track(sid)
            elif owner is not None and track is not None and track.fanout is not None:
                self.subscriber.add_track(stream_id(owner, track.info, p), sid, track.fanout)

    def _on_add_track(self, req: rtc.AddTrackRequest) -> None:
        p = self.participant
        if not p.grant.can_publish:
            log.warning("%s: publishing not allowed by its token", self.label)
            return  # like livekit-server: no TrackPublishedResponse, the SDK times out
        info = track_info_from_request(req)
        p.pending[req.cid] = info
        self.send(
            rtc.SignalResponse(track_published=rtc.TrackPublishedResponse(cid=req.cid, track=info))
        )

    async def _on_publisher_offer(self, offer: rtc.SessionDescription) -> None:
        p = self.participant
        answer_sdp, new_tracks, live_mids = await self.publisher.answer(offer.sdp)
        self.send(
            rtc.SignalResponse(
                answer=rtc.SessionDescription(type="answer", sdp=answer_sdp, id=offer.id)
            )
        )
        published: list[PublishedTrack] = []
        for track, transceiver in new_tracks:
            info = p.pending.pop(track.id, None)
            if info is None:  # unknown msid: take the oldest pending track of that kind
                want = models.TrackType.AUDIO if track.kind == "audio" else models.TrackType.VIDEO
                cid = next((c for c, i in p.pending.items() if i.type == want), None)
                info = p.pending.pop(cid) if cid is not None else None
            if info is None:
                log.warning(
                    "%s: media section %s matches no AddTrackRequest", self.label, transceiver.mid
                )
                continue
            info.mid = transceiver.mid or ""
            codecs = getattr(transceiver, "_codecs", None) or []
            info.mime_type = codecs[0].mimeType if codecs else _MIME[track.kind]
            published_track = PublishedTrack(info=info, fanout=TrackFanout(track))
            p.tracks[info.sid] = published_track
            published.append(published_track)
            log.info(
                "%s published %s track %s (%s)", self.label, track.kind, info.sid, info.mime_type
            )

        # Tracks whose media section no longer sends were unpublished by the client.
        removed = [sid for sid, t in p.tracks.items() if t.info.mid and t.info.mid not in live_mids]
        for sid in removed:
            gone = p.tracks.pop(sid)
            if gone.fanout is not None:
                gone.fanout.stop()
            log.info("%s unpublished %s", self.label, sid)

        if published or removed:
            # Updates go out before the offers that carry the tracks: the SDK maps a
            # received track to a publication it must already know.
            self.broadcast_update(p)
            for other in self.room.others(p):
                if other.session is None or not other.subscribes_to_all:
                    continue
                for sid in removed:
                    await other.session.subscriber.remove_track(sid)
                for new in published:
                    assert new.fanout is not None
                    other.session.subscriber.add_track(
                        stream_id(p, new.info, other), new.info.sid, new.fanout
                    )

    def _on_mute(self, req: rtc.MuteTrackRequest) -> None:
        track = self.participant.tracks.get(req.sid)
        if track is None:
            return
        track.info.muted = req.muted
        self.broadcast_update(self.participant)

    def _on_update_metadata(self, req: rtc.UpdateParticipantMetadata) -> None:
        p = self.participant
        if not p.grant.can_update_metadata:
            # livekit-server refuses unless the token has canUpdateOwnMetadata.
            log.warning("%s: metadata update refused: token lacks canUpdateOwnMetadata", self.label)
            reason = rtc.RequestResponse.Reason.NOT_ALLOWED
            message = "does not have permission to update own metadata"
        else:
            reason, message = rtc.RequestResponse.Reason.OK, ""
            if p.update_metadata(req):
                self.broadcast_update(p)
        if req.request_id:
            self.send(
                rtc.SignalResponse(
                    request_response=rtc.RequestResponse(
                        request_id=req.request_id, reason=reason, message=message
                    )
                )
            )

    # -- data -------------------------------------------------------------------

    def _on_data(self, channel_label: str, payload: bytes) -> None:
        """Relay a DataPacket (user data, RPC, data streams...) to its destinations."""
        p = self.participant
        if not p.grant.can_publish_data:
            return
        packet = models.DataPacket()
        try:
            packet.ParseFromString(payload)
        except Exception:
            log.warning("%s: undecodable data packet", self.label)
            return
        # The server, not the sender, vouches for who sent it.
        packet.participant_identity = p.identity
        packet.participant_sid = p.sid
        if packet.WhichOneof("value") == "user":
            packet.user.participant_identity = p.identity
            packet.user.participant_sid = p.sid
        wanted = set(packet.destination_identities)
        out = packet.SerializeToString()
        label = LOSSY if channel_label == LOSSY else RELIABLE
        for other in self.room.others(p):
            if other.session is None or (wanted and other.identity not in wanted):
                continue
            other.session.subscriber.send_data(label, out)
