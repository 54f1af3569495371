"""Room state of the dev server: who is in which room and what they publish.

Pure bookkeeping plus the protobuf views (`ParticipantInfo`, `TrackInfo`, `Room`)
that clients see; the signalling session drives it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from livekit.protocol import models, rtc

from appliance.dev.server.auth import Grant

if TYPE_CHECKING:
    from appliance.dev.server.media import TrackFanout
    from appliance.dev.server.session import ParticipantSession


def new_sid(prefix: str) -> str:
    """A LiveKit-style id: the SDK checks the PA_ / TR_ / RM_ prefixes."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class PublishedTrack:
    info: models.TrackInfo
    fanout: TrackFanout | None = None  # None until the media section is negotiated


@dataclass
class Participant:
    grant: Grant
    client_protocol: int = 0
    protocol: int = 0  # the signalling protocol version the client speaks
    firefox: bool = False
    # joined with auto_subscribe=False (the kiosk's visitor participant): gets only the
    # tracks it asks for with UpdateSubscription
    auto_subscribe: bool = True
    sid: str = field(default_factory=lambda: new_sid("PA"))
    joined_at: float = field(default_factory=time.time)
    state: int = models.ParticipantInfo.State.JOINED
    name: str = ""
    metadata: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    tracks: dict[str, PublishedTrack] = field(default_factory=dict)  # by track sid
    pending: dict[str, models.TrackInfo] = field(default_factory=dict)  # by client cid
    version: int = 0
    session: ParticipantSession | None = None

    def __post_init__(self) -> None:
        self.name = self.grant.name
        self.metadata = self.grant.metadata
        self.attributes = dict(self.grant.attributes)

    @property
    def identity(self) -> str:
        return self.grant.identity

    @property
    def subscribes_to_all(self) -> bool:
        return self.grant.can_subscribe and self.auto_subscribe

    def info(self, state: int | None = None) -> models.ParticipantInfo:
        # Clients drop updates whose version is not newer than what they have.
        self.version += 1
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            name=self.name,
            state=cast(Any, self.state if state is None else state),
            tracks=[t.info for t in self.tracks.values() if t.fanout is not None],
            metadata=self.metadata,
            attributes=self.attributes,
            joined_at=int(self.joined_at),
            joined_at_ms=int(self.joined_at * 1000),
            version=self.version,
            permission=self.grant.permission(),
            is_publisher=any(t.fanout is not None for t in self.tracks.values()),
            kind=cast(Any, self.grant.kind),  # the stubs type enums as classes, not ints
            client_protocol=self.client_protocol,
        )

    def update_metadata(self, req: rtc.UpdateParticipantMetadata) -> bool:
        """Apply a metadata/name/attribute update; return whether anything changed."""
        before = (self.name, self.metadata, dict(self.attributes))
        if req.name:
            self.name = req.name
        if req.metadata:
            self.metadata = req.metadata
        for key, value in req.attributes.items():
            # As in livekit-server: an empty value deletes the attribute.
            if value:
                self.attributes[key] = value
            else:
                self.attributes.pop(key, None)
        return before != (self.name, self.metadata, self.attributes)


# As livekit-server: a participant's camera and microphone form one media stream, so a
# browser plays them lip-synced; screen share and its audio another.
_SYNC_STREAMS = {
    models.TrackSource.CAMERA: "camera",
    models.TrackSource.MICROPHONE: "camera",
    models.TrackSource.SCREEN_SHARE: "screen",
    models.TrackSource.SCREEN_SHARE_AUDIO: "screen",
}


def stream_id(publisher: Participant, info: models.TrackInfo, subscriber: Participant) -> str:
    """The msid stream id a subscriber gets for a track: "PA_…|camera" to sync, else "PA_…|TR_…".

    Both SDKs then take the track sid from the msid track id.  livekit-server does
    this for protocol > 9 and never for Firefox, which cannot sync by stream."""
    if subscriber.protocol > 9 and not subscriber.firefox:
        stream = info.stream or _SYNC_STREAMS.get(info.source, "unknown")
        return f"{publisher.sid}|{stream}"
    return f"{publisher.sid}|{info.sid}"


def track_info_from_request(req: rtc.AddTrackRequest) -> models.TrackInfo:
    return models.TrackInfo(
        sid=new_sid("TR"),
        type=req.type,
        name=req.name,
        muted=req.muted,
        width=req.width,
        height=req.height,
        simulcast=False,  # we relay a single layer
        disable_dtx=req.disable_dtx,
        source=req.source,
        layers=[layer for layer in req.layers][:1],
        stereo=req.stereo,
        disable_red=req.disable_red,
        encryption=req.encryption,
        stream=req.stream,
    )


@dataclass
class Room:
    name: str
    sid: str = field(default_factory=lambda: new_sid("RM"))
    created: float = field(default_factory=time.time)
    participants: dict[str, Participant] = field(default_factory=dict)  # by identity
    # livekit-server's defaults: closed this long after it was created with nobody joining,
    # and this long after the last participant that is not an agent left
    empty_timeout: int = 300
    departure_timeout: int = 20
    metadata: str = ""
    closing: asyncio.TimerHandle | None = None  # the pending close, if any

    def keeps_open(self) -> bool:
        """Whether someone other than an agent is here (agents alone do not keep a room)."""
        return any(p.grant.kind != models.ParticipantInfo.Kind.AGENT for p in self.participants.values())

    def others(self, participant: Participant) -> list[Participant]:
        return [p for p in self.participants.values() if p is not participant]

    def by_sid(self, sid: str) -> Participant | None:
        return next((p for p in self.participants.values() if p.sid == sid), None)

    def info(self) -> models.Room:
        return models.Room(
            sid=self.sid,
            name=self.name,
            empty_timeout=self.empty_timeout,
            departure_timeout=self.departure_timeout,
            metadata=self.metadata,
            creation_time=int(self.created),
            creation_time_ms=int(self.created * 1000),
            num_participants=len(self.participants),
            num_publishers=sum(
                1 for p in self.participants.values() if any(t.fanout for t in p.tracks.values())
            ),
        )
